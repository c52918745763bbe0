from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowException

from operators.base import StageOperator
from stages.dedup.batches import SUMMED
from stages.dedup.inputs import DedupInputError
from stages.dedup.settings import DedupSettings
from stages.errors import InputError
from stages.layout import RunLayout

DEDUP_JOB = str(Path(__file__).resolve().parents[1] / "stages" / "dedup" / "job.py")
SEED = 0  # of the parts' shuffle: fixed, so the same raw files and settings give the same parts
# How stages/dedup/job.py ends when it rejects its input (DedupInputError): a log line
# "Dedup failed: <what is wrong>", then exit status 2. spark-submit passes both on.
INPUT_REJECTED_EXIT = 2
INPUT_REJECTED_LINE = "Dedup failed: "


def dedup_job_args(layout: RunLayout, settings: DedupSettings, seed: int = SEED) -> list[str]:
    """The dedup application's argv: the run's raw files in, its parquet parts out."""
    policy = settings.policy
    return [
        "--input", layout.raw,
        "--output", layout.dedup,
        "--partitions", str(settings.dedup_partitions),
        "--seed", str(seed),
        "--max-caption-length", str(policy.max_caption_length),
        "--long-captions", policy.long_captions,
        "--bad-files", policy.bad_files,
        "--changed-raw-files", settings.changed_raw_files,
    ]  # fmt: skip


class DedupOperator(StageOperator, SparkSubmitOperator):
    """spark-submit of ``stages/dedup/job.py`` through the ``spark_default`` connection.

    StageOperator comes first among the bases: its ``execute`` sets up storage, times the
    task and publishes the numbers :meth:`run` returns; :meth:`run` submits through
    SparkSubmitOperator's ``execute``, unless the output is already current. Input the job
    rejects (a malformed raw file with ``bad_files=fail``, no raw file at all) is an
    :class:`~stages.errors.InputError`: the task fails without retries. The store's
    credentials reach the Spark application through fsspec's environment configuration,
    never through its argv (which Airflow logs). Returns the job's ``_stats.json`` numbers,
    the job's own time as ``job_seconds``.

    :param output_root: the run's artifact root (templated)
    :param storage_conn_id: connection holding the store's credentials (templated)
    :param settings: :class:`stages.dedup.settings.DedupSettings` by field name (templated)
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, *StageOperator.template_fields)
    settings_class = DedupSettings

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("application", DEDUP_JOB)
        kwargs.setdefault("name", "laion-dedup")
        super().__init__(**kwargs)

    def run(self, context: Any) -> dict[str, Any]:
        from stages.dedup.outputs import current_output

        layout, settings = self.layout, self.stage_settings()
        try:
            # Every raw file already in a batch: no Spark application is submitted.
            stats = current_output(layout.raw, layout.dedup_marker, settings.changed_raw_files)
            added = stats is None
            if added:
                stats = self.submit(context, layout, settings)
        except DedupInputError as error:
            raise InputError(f"dedup rejected its input: {error}") from error
        return dedup_numbers(stats, added=added)

    def submit(self, context: Any, layout: RunLayout, settings: DedupSettings) -> dict[str, Any]:
        """spark-submit the job; the stats it recorded. Its verdict on its input is a DedupInputError here too."""
        self.application_args = dedup_job_args(layout, settings)
        try:
            SparkSubmitOperator.execute(self, context)
        except AirflowException as error:
            said = rejection(str(error))
            # Python also exits 2 on its own usage errors: only the job's line tells its verdict.
            if said is None or self.submit_exit_status() != INPUT_REJECTED_EXIT:
                raise
            raise DedupInputError(said) from error
        return layout.dedup_stats()

    def submit_exit_status(self) -> int | None:
        """The exit status of the last spark-submit, None when none ran."""
        process = getattr(self._hook, "_submit_sp", None)  # the hook keeps its Popen only privately
        return None if process is None else process.returncode


def dedup_numbers(stats: dict[str, Any], *, added: bool) -> dict[str, Any]:
    """The task's numbers: the dataset's totals, and the batch this run ``added`` (None when
    every raw file was already in the dataset), its job's time as ``job_seconds``."""
    totals = {k: v for k, v in stats.items() if k in (*SUMMED, "rows_invalid_by_reason", "parts", "partitions", "files_rejected")}
    latest = stats["batches"][-1] if added and stats.get("batches") else None
    batch = None if latest is None else {k: latest.get(k) for k in ("batch", *SUMMED, "parts")}
    return {**totals, "batches": len(stats.get("batches", [])), "added_batch": batch, "job_seconds": latest and latest.get("seconds")}


def rejection(spark_error: str) -> str | None:
    """What the job said was wrong with its input, from the output tail in a spark-submit
    error; None when it said nothing of the kind."""
    said = [line.split(INPUT_REJECTED_LINE, 1)[1] for line in spark_error.splitlines() if INPUT_REJECTED_LINE in line]
    return said[-1].strip() if said else None
