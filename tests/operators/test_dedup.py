"""DedupOperator: the trigger form's dedup params, the job's argv, settings from rendered
params, no submission when the output is already current, and input the job rejects
failing the task at once."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from fsspec.implementations.local import LocalFileSystem

from operators.dedup import DEDUP_JOB, DedupOperator, dedup_job_args, rejection
from operators.params import params_of, templates_of
from stages.dedup.batches import BatchPlan, modified, record_batch
from stages.dedup.settings import DedupSettings, RowPolicy
from stages.layout import RunLayout


def test_the_trigger_form_keeps_its_names_and_defaults() -> None:
    params = params_of(DedupSettings)
    assert {name: (param.value, param.schema) for name, param in params.items()} == {
        "dedup_partitions": (4, {"type": "integer", "minimum": 1, "maximum": 100000}),
        "max_caption_length": (4096, {"type": "integer", "minimum": 1}),
        "long_captions": ("truncate", {"type": "string", "enum": ["truncate", "reject"]}),
        "bad_files": ("fail", {"type": "string", "enum": ["fail", "skip"]}),
        "changed_raw_files": ("fail", {"type": "string", "enum": ["fail", "new_batch"]}),
    }
    assert params["bad_files"].description.startswith("A raw file that is not CSV/parquet or has no URL column")


def test_job_args() -> None:
    settings = DedupSettings(dedup_partitions=16, policy=RowPolicy(max_caption_length=300, long_captions="reject", bad_files="skip"))
    assert dedup_job_args(RunLayout("s3://laion/runs/1"), settings) == [
        "--input", "s3://laion/runs/1/raw",
        "--output", "s3://laion/runs/1/dedup",
        "--partitions", "16",
        "--seed", "0",
        "--max-caption-length", "300",
        "--long-captions", "reject",
        "--bad-files", "skip",
        "--changed-raw-files", "fail",
    ]  # fmt: skip


def test_settings_come_from_the_rendered_params(tmp_path: Path) -> None:
    from airflow.sdk import DAG

    with DAG("dedup_settings", schedule=None, params=params_of(DedupSettings), render_template_as_native_obj=True) as dag:
        operator = DedupOperator(task_id="dedup", output_root=str(tmp_path), settings=templates_of(DedupSettings))
    assert operator.application == DEDUP_JOB and Path(DEDUP_JOB).is_file()
    params = {"dedup_partitions": 7, "max_caption_length": 100, "long_captions": "reject", "bad_files": "skip", "changed_raw_files": "new_batch"}
    operator.render_template_fields({"params": params}, jinja_env=dag.get_template_env())
    assert operator.stage_settings() == DedupSettings(
        7, RowPolicy(max_caption_length=100, long_captions="reject", bad_files="skip"), changed_raw_files="new_batch"
    )


def test_a_current_output_is_not_submitted_again(tmp_path: Path) -> None:
    """Every raw file is in a recorded batch: nothing is submitted, the numbers are the dataset's."""
    layout = RunLayout(str(tmp_path))
    Path(layout.raw).mkdir()
    (Path(layout.raw) / "a.csv").write_text("URL,TEXT\nhttp://x.org/a.jpg,a\n")
    plan = BatchPlan(None, [("a.csv", (Path(layout.raw) / "a.csv").stat().st_size)], 0, 0, [])
    numbers = {"rows_in": 1, "rows_invalid": 0, "captions_truncated": 0, "duplicates_of_earlier_batches": 0, "rows_out": 1,
               "parts": ["part-00000.parquet", "part-00001.parquet"], "files_rejected": [], "seconds": 2.5}  # fmt: skip
    files = [{"name": "a.csv", "size": plan.new_files[0][1], "modified": modified(LocalFileSystem(), f"{layout.raw}/a.csv")}]
    layout.dedup_marker.mark_done({}, record_batch(plan, numbers, files, DedupSettings(dedup_partitions=2), seed=0))
    # No such connection: a submission would fail.
    operator = DedupOperator(task_id="dedup", output_root=str(tmp_path), settings={"dedup_partitions": 2}, conn_id="no_spark_here")
    numbers = operator.execute(context={})
    assert {k: v for k, v in numbers.items() if k not in ("started_at", "ended_at", "seconds")} == {
        "rows_in": 1, "rows_invalid": 0, "rows_invalid_by_reason": {}, "captions_truncated": 0, "duplicates_of_earlier_batches": 0,
        "rows_out": 1, "parts": ["part-00000.parquet", "part-00001.parquet"], "partitions": 2, "files_rejected": [],
        "batches": 1, "added_batch": None, "job_seconds": None,
    }  # fmt: skip
    assert numbers["seconds"] == round(numbers["ended_at"] - numbers["started_at"], 3)  # the task's own span


def test_input_the_job_rejects_fails_at_once(tmp_path: Path) -> None:
    """A real spark-submit (Spark local): the job rejects a gzipped file not named .gz; the
    task fails without retries and says which file and why."""
    layout = RunLayout(str(tmp_path))
    Path(layout.raw).mkdir()
    (Path(layout.raw) / "metadata.csv").write_bytes(gzip.compress(b"URL,TEXT\nhttp://x.org/a.jpg,a\n"))
    operator = DedupOperator(task_id="dedup", output_root=str(tmp_path), settings={"dedup_partitions": 1}, conn_id="spark_default")
    with pytest.raises(AirflowFailException, match=r"dedup rejected its input: input file .*raw/metadata.csv is gzip-compressed"):
        operator.execute(context={})
    assert layout.dedup_marker.read() is None


def test_no_raw_file_fails_at_once_before_any_submission(tmp_path: Path) -> None:
    """No such connection: a submission would fail otherwise."""
    Path(RunLayout(str(tmp_path)).raw).mkdir()
    operator = DedupOperator(task_id="dedup", output_root=str(tmp_path), conn_id="no_spark_here")
    with pytest.raises(AirflowFailException, match=r"dedup rejected its input: input folder .*raw holds no data files"):
        operator.execute(context={})


def test_any_other_spark_failure_is_left_to_the_retries(tmp_path: Path) -> None:
    """spark-submit of an application that is not there: Python exits 2 as the job does on
    bad input, but without the job's line it is no verdict on the input."""
    Path(RunLayout(str(tmp_path)).raw).mkdir()
    (Path(RunLayout(str(tmp_path)).raw) / "a.csv").write_text("URL,TEXT\nhttp://x.org/a.jpg,a\n")
    operator = DedupOperator(
        task_id="dedup", output_root=str(tmp_path), conn_id="spark_default", application=str(tmp_path / "no_such_job.py")
    )
    with pytest.raises(AirflowException, match="Cannot execute") as failed:
        operator.execute(context={})
    assert not isinstance(failed.value, AirflowFailException) and operator.submit_exit_status() == 2


def test_the_rejection_is_the_jobs_own_line() -> None:
    tail = "Cannot execute: spark-submit ... Error code is: 2.\nLast spark-submit output:\n" \
        "26/01/01 ERROR stages.dedup.job: Dedup failed: input folder /r/raw holds no data files\nshutdown hook"
    assert rejection(tail) == "input folder /r/raw holds no data files"
    assert rejection("Cannot execute: spark-submit ... Error code is: 2.\npython: can't open file") is None
