"""A dataset's batches: which raw files each dedup run added, and the totals over all of them.

A dataset grows by batches. Each dedup run takes the raw files it has not seen before (a
batch), drops their rows whose (URL, TEXT) is already in the dataset and writes the new
unique rows as new parts; earlier parts are never rewritten. ``dedup/_stats.json`` records
every batch (its files, parts, numbers) and the dataset's totals, and is written last.

No Spark here: the operator asks :func:`plan_batch` before deciding to submit.

::

    dedup/part-00000.parquet ...       every batch's parts, numbered on across batches
    dedup/keys/batch-00000/*.parquet   the 16-byte keys of each batch's rows (md5 of URL, TEXT)
    dedup/_stats.json                  batches, totals, removed files
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fsspec import AbstractFileSystem

from stages.dedup.inputs import DedupInputError
from stages.dedup.settings import DedupSettings

log = logging.getLogger(__name__)

FORMAT = 2  # _stats.json with batches; outputs without it are redone from scratch
KEYS_DIR = "keys"
# The numbers each batch records; the dataset's totals are their sums over live batches.
SUMMED = ("rows_in", "rows_invalid", "captions_truncated", "duplicates_of_earlier_batches", "rows_out")


@dataclass(frozen=True)
class BatchPlan:
    """What the next dedup run does: the raw files it reads and where its output goes."""

    earlier: dict[str, Any] | None  # the recorded _stats.json; None before the first batch
    new_files: list[tuple[str, int]]  # (name, size) of the batch's raw files, sorted
    batch: int  # the batch's number, never reused
    first_part: int  # the number of its first part, never reused
    key_folders: list[str]  # the key folders of every live earlier batch (names under dedup/)

    @property
    def version(self) -> str:
        """Names the batch's parts: the same files in the same batch give the same parts."""
        return f"{fingerprint(self.new_files)[:16]}-b{self.batch}"


def fingerprint(listing: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(sorted([list(entry) for entry in listing])).encode()).hexdigest()


def batch_name(batch: int) -> str:
    return f"batch-{batch:05d}"


def key_folder(batch: int) -> str:
    return posixpath.join(KEYS_DIR, batch_name(batch))


def is_current(recorded: Mapping[str, Any] | None) -> bool:
    return recorded is not None and recorded.get("format") == FORMAT and isinstance(recorded.get("batches"), list)


def plan_batch(
    fs: AbstractFileSystem,
    root: str,
    input_url: str,
    recorded: Mapping[str, Any] | None,
    listing: Sequence[tuple[str, int]],
    changed_raw_files: str = "fail",
) -> BatchPlan:
    """The batch of raw files under ``root`` that no recorded batch holds.

    A recorded file found again with other bytes is a :class:`DedupInputError` naming it
    (its rows are already in the dataset), unless ``changed_raw_files`` is "new_batch":
    then its new content is a file of this batch. A file of a removed batch, unchanged,
    is left out.
    """
    if not is_current(recorded):
        if recorded is not None:
            log.info("Starting the dataset over: %s/../dedup/_stats.json predates batches", input_url)
        return BatchPlan(None, sorted(listing), 0, 0, [])
    known = {f["name"]: f for f in recorded["files"]}
    removed = {f["name"]: f for f in recorded.get("removed_files", [])}
    new = []
    for name, size in sorted(listing):
        if name in known:
            if unchanged(fs, root, known[name], size):
                continue
            if changed_raw_files != "new_batch":
                raise DedupInputError(
                    f"raw file {input_url.rstrip('/')}/{name} changed since batch {known[name]['batch']} deduplicated it "
                    f"({known[name]['size']} bytes then, {size} now): its rows are already in the dataset. "
                    "Restore the file, give the new content another name, or set changed_raw_files to new_batch"
                )
            log.info("Raw file %s changed since batch %d: its new content is a new batch", name, known[name]["batch"])
        elif name in removed and unchanged(fs, root, removed[name], size):
            log.info("Leaving out raw file %s: its batch %d was removed", name, removed[name]["batch"])
            continue
        new.append((name, size))
    return BatchPlan(
        dict(recorded), new, recorded["next_batch"], recorded["next_part"],
        [key_folder(b["batch"]) for b in recorded["batches"]],
    )  # fmt: skip


def unchanged(fs: AbstractFileSystem, root: str, recorded: Mapping[str, Any], size: int) -> bool:
    """Whether the raw file holds the bytes it held when recorded: same size, and the same
    sha256 when its modification time moved (a touched file is not a changed one)."""
    if recorded["size"] != size:
        return False
    path = posixpath.join(root, recorded["name"])
    if modified(fs, path) == recorded.get("modified"):
        return True
    return sha256_of(fs, path) == recorded.get("sha256")


def modified(fs: AbstractFileSystem, path: str) -> str | None:
    info = fs.info(path)
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return None if value is None else str(value)


def sha256_of(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def record_batch(plan: BatchPlan, numbers: Mapping[str, Any], files: Sequence[Mapping[str, Any]],
                 settings: DedupSettings, seed: int) -> dict[str, Any]:  # fmt: skip
    """The dataset's _stats.json with the batch of ``plan`` added.

    ``numbers``: the batch's counts (:data:`SUMMED`, ``rows_invalid_by_reason``, ``parts``,
    ``files_rejected``, ``seconds``); ``files``: one entry per raw file read (name, size,
    sha256, modified, rows, format, delimiter).
    """
    earlier = plan.earlier or {}
    batch = {
        "batch": plan.batch,
        "version": plan.version,
        "files": [f["name"] for f in files],
        "partitions": settings.dedup_partitions,
        "seed": seed,
        "policy": asdict(settings.policy),
        **numbers,
    }
    replaced = {f["name"] for f in files}
    kept_files = [f for f in earlier.get("files", []) if f["name"] not in replaced]
    stats = {
        "format": FORMAT,
        "batches": [*earlier.get("batches", []), batch],
        "files": [*kept_files, *({**f, "batch": plan.batch} for f in files)],
        "removed_files": list(earlier.get("removed_files", [])),
        "removed_batches": list(earlier.get("removed_batches", [])),
        "next_batch": plan.batch + 1,
        "next_part": plan.first_part + len(numbers["parts"]),
    }
    return with_totals(stats)


def without_batch(recorded: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """The dataset's _stats.json with batch ``batch`` taken out; its raw files are listed as
    removed, so later runs leave them out."""
    found = [b for b in recorded["batches"] if b["batch"] == batch]
    if not found:
        live = ", ".join(str(b["batch"]) for b in recorded["batches"]) or "none"
        raise ValueError(f"the dataset has no batch {batch} (batches: {live})")
    gone = found[0]
    files = [f for f in recorded["files"] if f["batch"] != batch]
    removed = [f for f in recorded["files"] if f["batch"] == batch]
    stats = {
        **{k: v for k, v in recorded.items() if k not in ("batches", "files")},
        "batches": [b for b in recorded["batches"] if b["batch"] != batch],
        "files": files,
        "removed_files": [*recorded.get("removed_files", []), *removed],
        "removed_batches": [*recorded.get("removed_batches", []), {k: gone[k] for k in ("batch", "files", "parts", "rows_out")}],
    }
    return with_totals(stats)


def with_totals(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with the dataset's totals over its live batches, and the latest batch's settings."""
    batches = stats["batches"]
    totals: dict[str, Any] = {key: sum(b.get(key, 0) for b in batches) for key in SUMMED}
    reasons: dict[str, int] = {}
    for b in batches:
        for reason, n in b.get("rows_invalid_by_reason", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    latest = batches[-1] if batches else {}
    live_files = [(f["name"], f["size"]) for f in stats["files"]]
    return {
        **stats,
        **totals,
        "rows_invalid_by_reason": dict(sorted(reasons.items())),
        "parts": [part for b in batches for part in b["parts"]],
        "files_rejected": [r for b in batches for r in b.get("files_rejected", [])],
        "input_fingerprint": fingerprint(live_files),
        "partitions": latest.get("partitions"),
        "seed": latest.get("seed"),
        "latest_batch": latest.get("batch"),
    }

