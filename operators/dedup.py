from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from operators.base import StageOperator
from stages.dedup.settings import DedupSettings
from stages.layout import RunLayout

DEDUP_JOB = str(Path(__file__).resolve().parents[1] / "stages" / "dedup" / "job.py")
SEED = 0  # of the parts' shuffle: fixed, so the same raw files and settings give the same parts


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
    ]  # fmt: skip


class DedupOperator(StageOperator, SparkSubmitOperator):
    """spark-submit of ``stages/dedup/job.py`` through the ``spark_default`` connection.

    StageOperator comes first among the bases: its ``execute`` sets up storage, times the
    task and publishes the numbers :meth:`run` returns; :meth:`run` submits through
    SparkSubmitOperator's ``execute``, unless the output is already current. The store's
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
        # Already made from these raw files and settings: no Spark application is submitted.
        stats = current_output(layout.raw, layout.dedup_marker, settings, SEED)
        if stats is None:
            self.application_args = dedup_job_args(layout, settings)
            SparkSubmitOperator.execute(self, context)
            stats = layout.dedup_stats()
        numbers = {k: v for k, v in stats.items() if k not in ("files", "seconds", "policy")}
        return {**numbers, "job_seconds": stats.get("seconds")}
