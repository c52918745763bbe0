"""stages.dedup.job: the Spark application's settings and arguments, and that it starts as a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages.dedup import job
from stages.dedup.settings import DedupSettings, RowPolicy
from stages.layout import DEDUP_MARKER

JOB_FILE = Path(job.__file__)


def test_job_binds_local_masters_to_loopback() -> None:
    assert job.spark_settings("local[*]", partitions=3, cores=8, local_ip="127.0.0.1") == {
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.host": "127.0.0.1",
        "spark.sql.shuffle.partitions": "8",
        "spark.ui.enabled": "true",
    }
    assert job.spark_settings("local[2]", partitions=16, cores=2, local_ip=None)["spark.ui.enabled"] == "false"
    assert job.spark_settings("yarn", partitions=3, cores=8, local_ip=None) == {}
    args = job.parse_args(["--input", "s3://b/raw", "--output", "s3://b/dedup", "--partitions", "4"])
    assert (args.input, args.output, args.partitions, args.seed) == ("s3://b/raw", "s3://b/dedup", 4, 0)
    with pytest.raises(SystemExit):
        job.parse_args(["--input", "a", "--output", "b", "--partitions", "0"])


def test_arguments_give_the_settings_with_their_defaults() -> None:
    args = job.parse_args(["--input", "a", "--output", "b", "--partitions", "4"])
    assert job.settings_of(args) == DedupSettings(dedup_partitions=4)
    args = job.parse_args(["--input", "a", "--output", "b", "--partitions", "2", "--max-caption-length", "9",
                           "--long-captions", "reject", "--bad-files", "skip"])  # fmt: skip
    assert job.settings_of(args) == DedupSettings(2, RowPolicy(max_caption_length=9, long_captions="reject", bad_files="skip"))
    with pytest.raises(SystemExit):
        job.parse_args(["--input", "a", "--output", "b", "--partitions", "2", "--long-captions", "drop"])


def test_the_job_file_runs_as_a_script() -> None:
    """spark-submit runs the file, not the module: its imports must work from there."""
    done = subprocess.run([sys.executable, str(JOB_FILE), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--partitions" in done.stdout and DEDUP_MARKER in done.stdout
