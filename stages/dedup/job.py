"""The dedup stage as a Spark application: what DedupOperator spark-submits.

    spark-submit --master 'local[*]' stages/dedup/job.py \
        --input s3://bucket/raw --output s3://bucket/dedup --partitions 16 [--seed 0]

Each submission deduplicates the raw files that no earlier batch holds (see stages.dedup).

Run as a file, Python puts only this folder on sys.path: ``stages`` is imported as the
installed project (``make venv`` installs it in editable mode) or from PYTHONPATH.
S3 credentials come from fsspec's own configuration (the FSSPEC_S3 environment
variable), never from the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from stages.dedup import run
from stages.dedup.inputs import DedupInputError
from stages.dedup.settings import BAD_FILES, CHANGED_RAW_FILES, LONG_CAPTIONS, DedupSettings, RowPolicy
from stages.layout import DEDUP_MARKER

log = logging.getLogger("stages.dedup.job")  # not __name__: that is "__main__" under spark-submit

LOOPBACK = "127.0.0.1"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = RowPolicy()
    parser = argparse.ArgumentParser(description="Deduplicate raw LAION metadata into parquet parts.")
    parser.add_argument("--input", required=True, help="folder of raw CSV/parquet files (path or URL)")
    parser.add_argument("--output", required=True, help=f"folder for the parts and {DEDUP_MARKER} (path or URL)")
    parser.add_argument("--partitions", required=True, type=_positive_int, help="number of output parts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic shuffle")
    parser.add_argument("--max-caption-length", type=_positive_int, default=defaults.max_caption_length,
                        help="longest caption kept whole")
    parser.add_argument("--long-captions", choices=LONG_CAPTIONS, default=defaults.long_captions)
    parser.add_argument("--bad-files", choices=BAD_FILES, default=defaults.bad_files,
                        help="a file that is not CSV/parquet or has no URL column: fail, or move it aside")
    parser.add_argument("--changed-raw-files", choices=CHANGED_RAW_FILES, default=DedupSettings().changed_raw_files,
                        help="a raw file of an earlier batch that now holds other bytes: fail, or a new batch")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> DedupSettings:
    policy = RowPolicy(max_caption_length=args.max_caption_length, long_captions=args.long_captions, bad_files=args.bad_files)
    return DedupSettings(dedup_partitions=args.partitions, policy=policy, changed_raw_files=args.changed_raw_files)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def spark_settings(master: str, partitions: int, cores: int, local_ip: str | None) -> dict[str, str]:
    """Session settings for `master`: a local master binds to loopback and shuffles small.

    The web UI binds to SPARK_LOCAL_IP (`local_ip`), or to every interface when it is
    unset, so a local run keeps it only when SPARK_LOCAL_IP is loopback.
    """
    if not master.startswith("local"):
        return {}
    return {
        "spark.driver.bindAddress": LOOPBACK,
        "spark.driver.host": LOOPBACK,
        "spark.sql.shuffle.partitions": str(max(partitions, cores)),
        "spark.ui.enabled": str(local_ip == LOOPBACK).lower(),
    }


def submitted_master() -> str:
    """The --master spark-submit was given (its JVM is already running)."""
    SparkContext._ensure_initialized()  # attach to spark-submit's JVM so SparkConf sees its settings
    return SparkConf().get("spark.master", "local[*]")


def build_spark(partitions: int) -> SparkSession:
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # started by spark-submit
        master = submitted_master()
    else:  # plain python: the JVM launched from here inherits SPARK_LOCAL_IP
        master = "local[*]"
        os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    settings = spark_settings(master, partitions, os.cpu_count() or 1, os.environ.get("SPARK_LOCAL_IP"))
    builder = SparkSession.builder.appName("laion-dedup").master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")  # keep the task log to this job's own lines
    return spark


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spark = build_spark(args.partitions)
    try:
        stats = run(spark, args.input, args.output, settings_of(args), seed=args.seed)
    except DedupInputError as error:
        log.error("Dedup failed: %s", error)
        return 2
    finally:
        spark.stop()
    log.info("Dedup done: %d unique rows of %d in %d batches", stats["rows_out"], stats["rows_in"], len(stats["batches"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
