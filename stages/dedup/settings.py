"""The dedup stage's settings: the DAG's trigger form, the operator and the Spark job read them here."""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.settings import setting

LONG_CAPTIONS = ("truncate", "reject")
BAD_FILES = ("fail", "skip")
CHANGED_RAW_FILES = ("fail", "new_batch")


@dataclass(frozen=True)
class RowPolicy:
    """What makes a row invalid beyond a missing http(s) URL, and what to do with bad files.

    ``long_captions``: "truncate" cuts captions to ``max_caption_length`` characters,
    "reject" drops those rows; both are counted. ``bad_files``: "fail" stops the job on a
    file that is not CSV/parquet or has no URL column; "skip" moves it to
    ``<input>/_rejected/`` and reports it. An output records these fields as its "policy".
    """

    max_caption_length: int = setting(
        4096, type="integer", minimum=1, description="Captions longer than this are truncated or rejected."
    )
    long_captions: str = setting("truncate", type="string", enum=list(LONG_CAPTIONS))
    bad_files: str = setting(
        "fail", type="string", enum=list(BAD_FILES),
        description="A raw file that is not CSV/parquet or has no URL column: fail the run, or move it to raw/_rejected/ and report it.",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_caption_length < 1:
            raise ValueError(f"max_caption_length must be at least 1, got {self.max_caption_length}")
        if self.long_captions not in LONG_CAPTIONS:
            raise ValueError(f"long_captions must be 'truncate' or 'reject', got {self.long_captions!r}")
        if self.bad_files not in BAD_FILES:
            raise ValueError(f"bad_files must be 'fail' or 'skip', got {self.bad_files!r}")


@dataclass(frozen=True)
class DedupSettings:
    """How many parts each batch's dedup writes, its row policy, and what a changed raw file means.

    Settings apply to the batch being deduplicated; earlier batches keep what they were made with.
    """

    dedup_partitions: int = setting(
        4, type="integer", minimum=1, maximum=100000, description="Parts each new batch of raw files is written as."
    )
    policy: RowPolicy = field(default_factory=RowPolicy)
    changed_raw_files: str = setting(
        "fail", type="string", enum=list(CHANGED_RAW_FILES),
        description="A raw file deduplicated before that now holds other bytes: fail naming it, or add its new content as a new batch.",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.dedup_partitions < 1:
            raise ValueError(f"dedup_partitions must be at least 1, got {self.dedup_partitions}")
        if self.changed_raw_files not in CHANGED_RAW_FILES:
            raise ValueError(f"changed_raw_files must be 'fail' or 'new_batch', got {self.changed_raw_files!r}")
