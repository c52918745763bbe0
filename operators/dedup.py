from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from operators.base import emit_stage_metrics, timed
from stages import storage

DEDUP_JOB = str(Path(__file__).resolve().parents[1] / "stages" / "dedup_job.py")


def dedup_job_args(*, output_root: str, partitions: int, seed: int = 0) -> list[str]:
    """The dedup application's argv: raw files in, parquet parts out."""
    return [
        "--input", storage.join(output_root, "raw"),
        "--output", storage.join(output_root, "dedup"),
        "--partitions", str(partitions),
        "--seed", str(seed),
    ]


class DedupOperator(SparkSubmitOperator):
    """spark-submit of ``stages/dedup_job.py`` through the ``spark_default`` connection.

    The store's credentials reach the Spark application through fsspec's environment
    configuration, never through its argv (which Airflow logs). Returns the job's
    ``_stats.json`` with the wall time of the whole submission.

    :param output_root: the run's artifact root (templated)
    :param partitions: number of parquet parts to write (templated)
    :param storage_conn_id: connection holding the store's credentials (templated)
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "output_root", "partitions", "storage_conn_id")

    def __init__(self, *, output_root: str, partitions: int | str, storage_conn_id: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("application", DEDUP_JOB)
        kwargs.setdefault("name", "laion-dedup")
        super().__init__(**kwargs)
        self.output_root = output_root
        self.partitions = partitions
        self.storage_conn_id = storage_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        storage.configure_storage(str(self.output_root), self.storage_conn_id)
        self.application_args = dedup_job_args(output_root=str(self.output_root), partitions=int(self.partitions))
        started = time.time()
        super().execute(context)
        stats = storage.read_json(storage.join(str(self.output_root), "dedup", "_stats.json"))
        numbers = {k: v for k, v in stats.items() if k not in ("files", "seconds")}
        numbers = timed(started, time.time(), {**numbers, "job_seconds": stats.get("seconds")})
        emit_stage_metrics(self.task_id, numbers)
        return numbers
