from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from operators.base import emit_stage_metrics, timed
from stages import storage

DEDUP_JOB = str(Path(__file__).resolve().parents[1] / "stages" / "dedup_job.py")


def dedup_job_args(
    *,
    output_root: str,
    partitions: int,
    seed: int = 0,
    max_caption_length: int = 4096,
    long_captions: str = "truncate",
    bad_files: str = "fail",
) -> list[str]:
    """The dedup application's argv: raw files in, parquet parts out."""
    return [
        "--input", storage.join(output_root, "raw"),
        "--output", storage.join(output_root, "dedup"),
        "--partitions", str(partitions),
        "--seed", str(seed),
        "--max-caption-length", str(max_caption_length),
        "--long-captions", long_captions,
        "--bad-files", bad_files,
    ]  # fmt: skip


class DedupOperator(SparkSubmitOperator):
    """spark-submit of ``stages/dedup_job.py`` through the ``spark_default`` connection.

    The store's credentials reach the Spark application through fsspec's environment
    configuration, never through its argv (which Airflow logs). Returns the job's
    ``_stats.json`` with the wall time of the whole submission.

    :param output_root: the run's artifact root (templated)
    :param partitions: number of parquet parts to write (templated)
    :param storage_conn_id: connection holding the store's credentials (templated)
    :param row_policy: max_caption_length, long_captions, bad_files (templated)
    """

    template_fields: Sequence[str] = (
        *SparkSubmitOperator.template_fields,
        "output_root",
        "partitions",
        "storage_conn_id",
        "row_policy",
    )

    def __init__(
        self,
        *,
        output_root: str,
        partitions: int | str,
        storage_conn_id: str | None = None,
        row_policy: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("application", DEDUP_JOB)
        kwargs.setdefault("name", "laion-dedup")
        super().__init__(**kwargs)
        self.output_root = output_root
        self.partitions = partitions
        self.storage_conn_id = storage_conn_id
        self.row_policy = row_policy or {}

    def execute(self, context: Any) -> dict[str, Any]:
        from dataclasses import asdict

        from stages.dedup import RowPolicy, current_output

        root = str(self.output_root)
        storage.configure_storage(root, self.storage_conn_id)
        policy = RowPolicy(
            max_caption_length=int(self.row_policy.get("max_caption_length", 4096)),
            long_captions=str(self.row_policy.get("long_captions", "truncate")),
            bad_files=str(self.row_policy.get("bad_files", "fail")),
        )
        started = time.time()
        # Already made from these raw files and settings: no Spark application is submitted.
        stats = current_output(storage.join(root, "raw"), storage.join(root, "dedup"), int(self.partitions), 0, policy)
        if stats is None:
            self.application_args = dedup_job_args(output_root=root, partitions=int(self.partitions), **asdict(policy))
            super().execute(context)
            stats = storage.read_json(storage.join(root, "dedup", "_stats.json"))
        numbers = {k: v for k, v in stats.items() if k not in ("files", "seconds", "policy")}
        numbers = timed(started, time.time(), {**numbers, "job_seconds": stats.get("seconds")})
        emit_stage_metrics(self.task_id, numbers)
        return numbers
