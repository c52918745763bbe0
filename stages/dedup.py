"""Dedup stage: raw LAION metadata files in, N shuffled parquet parts out.

Every CSV or parquet file in the input folder is read on its own, aligned to
REFERENCE_SCHEMA, stripped of rows without an http(s) URL and of exact (URL, TEXT)
duplicates, shuffled by a seeded hash and written as `part-00000.parquet` ...
`part-{N-1}.parquet`. `_stats.json` is written last: the output is complete exactly
when it exists, and a rerun over the same input is skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

from stages import storage

log = logging.getLogger(__name__)

REFERENCE_SCHEMA = StructType(
    [
        StructField("SAMPLE_ID", LongType()),
        StructField("URL", StringType()),
        StructField("TEXT", StringType()),
        StructField("HEIGHT", IntegerType()),
        StructField("WIDTH", IntegerType()),
        StructField("LICENSE", StringType()),
        StructField("NSFW", StringType()),
        StructField("similarity", DoubleType()),
    ]
)
# Lower-cased header names accepted for each reference column, best match first.
HEADER_NAMES: dict[str, tuple[str, ...]] = {
    field.name: (field.name.lower(),) for field in REFERENCE_SCHEMA
} | {"TEXT": ("text", "caption")}
DELIMITERS = ("|", ",", "\t", ";")
DEDUP_KEY = ("URL", "TEXT")
STATS_FILE = "_stats.json"
_FILE_INDEX = "_file_index"
_VALID = "_valid"


class DedupInputError(ValueError):
    """The input folder or one of its files cannot be read as LAION metadata."""


@dataclass(frozen=True)
class InputFile:
    name: str  # file name inside the input folder
    source: str  # where it came from, for messages
    local_path: str  # where Spark reads it
    format: str  # "csv" or "parquet"
    delimiter: str | None  # None for parquet


def run(
    spark: SparkSession, input_url: str, output_url: str, partitions: int, seed: int = 0
) -> dict[str, Any]:
    """Deduplicate every file under `input_url` into `partitions` parts under `output_url`.

    Both URLs may be local paths, file:// or any fsspec URL such as s3://bucket/prefix.
    Returns the stats written to `<output_url>/_stats.json` (or found there, when skipped).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    started = time.monotonic()
    in_fs, in_root = fsspec.core.url_to_fs(input_url)
    out_fs, out_root = fsspec.core.url_to_fs(output_url)
    listing = list_input_files(in_fs, in_root, input_url)
    fingerprint = input_fingerprint(listing)
    previous = storage.read_json_or_none(storage.join(output_url, STATS_FILE))
    if previous is not None:
        done = (previous.get("input_fingerprint"), previous.get("partitions"), previous.get("seed"))
        if done == (fingerprint, partitions, seed):
            log.info(
                "Skipping dedup: %s/%s already records input fingerprint %s, %d partitions, seed %d",
                output_url, STATS_FILE, fingerprint[:12], partitions, seed,
            )  # fmt: skip
            return previous
        log.info("Redoing dedup: %s/%s was made from other input or settings", output_url, STATS_FILE)

    with _local_input_dir(in_fs, in_root, listing) as input_dir:
        files = [
            detect_file(name, f"{input_url.rstrip('/')}/{name}", os.path.join(input_dir, name))
            for name, _ in listing
        ]
        rows = tag_rows(spark, files)  # reads the headers: a bad file fails before any output
        counts = count_rows(rows)
        deduped = shuffle(drop_duplicates(rows.where(F.col(_VALID))), partitions, seed)
        with _work_dir(out_fs, out_root) as work:
            parts = write_parts(deduped, work, partitions)
            stats = {
                "rows_in": sum(total for total, _ in counts.values()),
                "rows_invalid": sum(invalid for _, invalid in counts.values()),
                "rows_out": sum(pq.read_metadata(part).num_rows for part in parts),
                "partitions": partitions,
                "seed": seed,
                "parts": [part_name(index) for index in range(partitions)],
                "files": [
                    {"name": f.name, "rows": counts.get(i, (0, 0))[0], "format": f.format, "delimiter": f.delimiter}
                    for i, f in enumerate(files)
                ],
                "input_fingerprint": fingerprint,
                "seconds": round(time.monotonic() - started, 3),
            }
            publish(out_fs, out_root, parts)
            storage.write_json(storage.join(output_url, STATS_FILE), stats)  # last: marks the output complete
    log.info(
        "Dedup wrote %d of %d rows (%d without an http(s) URL) to %s in %d parts",
        stats["rows_out"], stats["rows_in"], stats["rows_invalid"], output_url, partitions,
    )  # fmt: skip
    return stats


def list_input_files(fs: AbstractFileSystem, root: str, input_url: str) -> list[tuple[str, int]]:
    """(name, size) of the data files directly under `root`, sorted; '_' and '.' names are skipped."""
    if not fs.isdir(root):
        raise DedupInputError(f"input folder {input_url} does not exist")
    listing = sorted(
        (Path(entry["name"]).name, int(entry["size"]))
        for entry in fs.ls(root, detail=True)
        if entry["type"] == "file" and not Path(entry["name"]).name.startswith(("_", "."))
    )
    if not listing:
        raise DedupInputError(f"input folder {input_url} holds no data files")
    return listing


def input_fingerprint(listing: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()


def detect_file(name: str, source: str, local_path: str) -> InputFile:
    """Tell parquet from CSV (by extension or magic bytes) and sniff a CSV's delimiter."""
    with open(local_path, "rb") as handle:
        magic = handle.read(4)
    if name.lower().endswith(".parquet") or magic == b"PAR1":
        return InputFile(name, source, local_path, "parquet", None)
    gzipped = name.lower().endswith(".gz")
    if magic.startswith(b"\x1f\x8b") and not gzipped:
        raise DedupInputError(f"input file {source} is gzip-compressed: rename it to end in .gz")
    try:
        with (gzip.open if gzipped else open)(local_path, "rb") as handle:
            header = handle.readline(1 << 16).decode("utf-8-sig")
        if "\x00" in header or not header.strip():
            raise ValueError("no text header row")
    except (OSError, EOFError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise DedupInputError(
            f"input file {source} is neither CSV nor parquet (columns: none, {error}); "
            "expected a CSV with a header row or a parquet file"
        ) from error
    return InputFile(name, source, local_path, "csv", sniff_delimiter(header))


def sniff_delimiter(header: str) -> str:
    """The candidate delimiter seen most often outside quotes in a header line (',' if none)."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(DELIMITERS, key=counts.__getitem__)
    return best if counts[best] else ","


def read_file(spark: SparkSession, file: InputFile) -> DataFrame:
    """One input file as a DataFrame with REFERENCE_SCHEMA."""
    path = "file://" + os.path.abspath(file.local_path)
    if file.format == "parquet":
        frame = spark.read.parquet(path)
    else:
        # multiLine: quoted captions may hold the delimiter or newlines; every column stays a string.
        options = {"header": True, "sep": file.delimiter, "quote": '"', "escape": '"', "mode": "PERMISSIVE"}
        frame = spark.read.csv(path, multiLine=True, **options)
    return align_to_reference(frame, file.source)


def align_to_reference(frame: DataFrame, source: str) -> DataFrame:
    """Rename, cast and order columns as REFERENCE_SCHEMA; missing ones become null."""
    by_name = {column.strip().lstrip("\ufeff").lower(): column for column in reversed(frame.columns)}
    matched = {
        target: next((by_name[name] for name in names if name in by_name), None)
        for target, names in HEADER_NAMES.items()
    }
    if matched["URL"] is None:
        raise DedupInputError(
            f"input file {source} has no URL column (columns: {', '.join(frame.columns)}); "
            "expected a column named URL or url"
        )
    return frame.select([_cast(frame, matched[field.name], field) for field in REFERENCE_SCHEMA])


def _cast(frame: DataFrame, column: str | None, field: StructField) -> Column:
    """try_cast, so an unparseable value becomes null even with ANSI mode on."""
    if column is None:
        return F.lit(None).cast(field.dataType).alias(field.name)
    value = F.col("`" + column.replace("`", "``") + "`")
    cast = value.try_cast(field.dataType)
    is_text = isinstance(frame.schema[column].dataType, StringType)
    if is_text and isinstance(field.dataType, (IntegerType, LongType)):
        # Some dumps write sizes as "256.0"; accept whole numbers, not "256.5".
        number = value.try_cast(DoubleType())
        cast = F.coalesce(cast, F.when(number % 1 == 0, number.try_cast(field.dataType)))
    return cast.alias(field.name)


def tag_rows(spark: SparkSession, files: Sequence[InputFile]) -> DataFrame:
    """All input rows, with the index of their file and whether their URL is http(s)."""
    frames = [read_file(spark, file).withColumn(_FILE_INDEX, F.lit(i)) for i, file in enumerate(files)]
    rows = frames[0]
    for frame in frames[1:]:
        rows = rows.unionByName(frame)
    valid = F.coalesce(F.col("URL").rlike("(?i)^https?://"), F.lit(False))
    return rows.withColumn(_VALID, valid)


def count_rows(rows: DataFrame) -> dict[int, tuple[int, int]]:
    """file index -> (rows, rows without an http(s) URL); files without rows are absent."""
    invalid = F.sum(F.when(F.col(_VALID), 0).otherwise(1))
    counted = rows.groupBy(_FILE_INDEX).agg(F.count(F.lit(1)).alias("rows"), invalid.alias("invalid"))
    return {row[_FILE_INDEX]: (row["rows"], row["invalid"]) for row in counted.collect()}


def drop_duplicates(rows: DataFrame) -> DataFrame:
    """One row per (URL, TEXT).

    The kept row is chosen by value (first file by name, then a present and smallest
    SAMPLE_ID, then the other columns), so a rerun keeps the same row however Spark
    happens to split the input.
    """
    others = [field.name for field in REFERENCE_SCHEMA if field.name not in DEDUP_KEY]
    rank = [F.col(_FILE_INDEX), F.col("SAMPLE_ID").isNull().alias("_no_id"), *others]
    kept = rows.groupBy(*DEDUP_KEY).agg(F.min(F.struct(*rank)).alias("_kept"))
    columns = [name if name in DEDUP_KEY else F.col(f"_kept.{name}").alias(name) for name in REFERENCE_SCHEMA.names]
    return kept.select(columns)


def shuffle(rows: DataFrame, partitions: int, seed: int) -> DataFrame:
    """Spread rows over `partitions` by a seeded hash, in hash order within each one."""
    order = F.xxhash64(*DEDUP_KEY, F.lit(seed))
    return (
        rows.withColumn("_order", order)
        .repartition(partitions, "_order")
        .sortWithinPartitions("_order", *DEDUP_KEY)
        .drop("_order")
    )


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_parts(rows: DataFrame, work_dir: str, partitions: int) -> list[str]:
    """Write `rows` under `work_dir`; return exactly `partitions` local files, part 0 first.

    Spark writes no file for an empty partition, so those get an empty table with the schema.
    """
    spark_dir = os.path.join(work_dir, "spark")
    rows.write.option("maxRecordsPerFile", 0).parquet("file://" + os.path.abspath(spark_dir))
    written: dict[int, str] = {}
    for path in sorted(Path(spark_dir).glob("part-*.parquet")):
        index = int(path.name.split("-")[1])
        if index in written:
            raise RuntimeError(f"Spark wrote two files for partition {index} in {spark_dir}")
        written[index] = str(path)
    if not written:
        raise RuntimeError(f"Spark wrote no parquet file in {spark_dir}")
    schema = pq.read_schema(next(iter(written.values())))
    parts = []
    for index in range(partitions):
        part = os.path.join(work_dir, part_name(index))
        if index in written:
            os.replace(written[index], part)
        else:
            pq.write_table(schema.empty_table(), part)
        parts.append(part)
    return parts


def publish(out_fs: AbstractFileSystem, out_root: str, parts: Sequence[str]) -> None:
    """Move (local) or upload (remote) the parts to their stable names and drop stale ones."""
    stats_path = f"{out_root}/{STATS_FILE}"
    if out_fs.exists(stats_path):
        out_fs.rm_file(stats_path)  # the output is incomplete until the new stats land
    for part in parts:
        destination = f"{out_root}/{Path(part).name}"
        if isinstance(out_fs, LocalFileSystem):
            os.replace(part, destination)
        else:
            out_fs.put_file(part, destination)
    names = {Path(part).name for part in parts}
    for stale in out_fs.glob(f"{out_root}/part-*.parquet"):
        if Path(stale).name not in names:
            out_fs.rm_file(stale)


# Spark here has no hadoop-aws jars, so remote inputs are copied to the driver's disk and
# the finished parts uploaded from there. That suits a local master only (executors on
# other machines cannot see the driver's disk); a cluster should read and write s3a://
# paths through hadoop-aws instead.
@contextlib.contextmanager
def _local_input_dir(fs: AbstractFileSystem, root: str, listing: Sequence[tuple[str, int]]) -> Iterator[str]:
    if isinstance(fs, LocalFileSystem):
        yield root
        return
    staging = tempfile.mkdtemp(prefix="dedup-input-")
    try:
        for name, _ in listing:
            fs.get_file(f"{root}/{name}", os.path.join(staging, name))
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _work_dir(out_fs: AbstractFileSystem, out_root: str) -> Iterator[str]:
    """`<output>/_tmp-<uuid>/` for a local output (so parts move by rename), else a local temp folder."""
    local = isinstance(out_fs, LocalFileSystem)
    parent = out_root if local else tempfile.mkdtemp(prefix="dedup-output-")
    work = os.path.join(parent, f"_tmp-{uuid.uuid4().hex}")
    os.makedirs(work)
    try:
        yield work
    finally:
        shutil.rmtree(work if local else parent, ignore_errors=True)
