"""Dedup stage: raw LAION metadata files in, N shuffled parquet parts out.

Every CSV or parquet file in the input folder is read on its own, aligned to
REFERENCE_SCHEMA, stripped of rows without an http(s) URL and of exact (URL, TEXT)
duplicates, shuffled by a seeded hash and written as `part-00000.parquet` ...
`part-{N-1}.parquet`. `_stats.json` is written last: the output is complete exactly
when it exists, and a rerun over the same input is skipped.
"""

from __future__ import annotations

import contextlib
import csv
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
from dataclasses import asdict, dataclass
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
REJECTED_DIR = "_rejected"
REJECTED_SAMPLE_PER_REASON = 100
_FILE_INDEX = "_file_index"
_REASON = "_reason"
_MALFORMED = "_malformed"
_CORRUPT = "_corrupt_record"


@dataclass(frozen=True)
class RowPolicy:
    """What makes a row invalid beyond a missing http(s) URL, and what to do with bad files.

    ``long_captions``: "truncate" cuts captions to ``max_caption_length`` characters,
    "reject" drops those rows; both are counted. ``bad_files``: "fail" stops the job on a
    file that is not CSV/parquet or has no URL column; "skip" moves it to
    ``<input>/_rejected/`` and reports it.
    """

    max_caption_length: int = 4096
    long_captions: str = "truncate"
    bad_files: str = "fail"

    def __post_init__(self) -> None:
        if self.max_caption_length < 1:
            raise ValueError(f"max_caption_length must be at least 1, got {self.max_caption_length}")
        if self.long_captions not in ("truncate", "reject"):
            raise ValueError(f"long_captions must be 'truncate' or 'reject', got {self.long_captions!r}")
        if self.bad_files not in ("fail", "skip"):
            raise ValueError(f"bad_files must be 'fail' or 'skip', got {self.bad_files!r}")


class DedupInputError(ValueError):
    """The input folder or one of its files cannot be read as LAION metadata."""


@dataclass(frozen=True)
class InputFile:
    name: str  # file name inside the input folder
    source: str  # where it came from, for messages
    local_path: str  # where Spark reads it
    format: str  # "csv" or "parquet"
    delimiter: str | None  # None for parquet
    header: str | None = None  # a CSV's first line


def run(
    spark: SparkSession,
    input_url: str,
    output_url: str,
    partitions: int,
    seed: int = 0,
    policy: RowPolicy = RowPolicy(),
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
    previous = current_output(input_url, output_url, partitions, seed, policy, listing)
    if previous is not None:
        return previous

    with _local_input_dir(in_fs, in_root, listing) as input_dir:
        files, frames, rejected_files = [], [], []
        for name, _ in listing:
            source = f"{input_url.rstrip('/')}/{name}"
            try:
                file = detect_file(name, source, os.path.join(input_dir, name))
                frame = read_file(spark, file)  # reads the header: a bad file fails before any output
            except DedupInputError as error:
                if policy.bad_files == "fail":
                    raise
                log.warning("Moving %s aside to %s/: %s", source, REJECTED_DIR, error)
                set_aside(in_fs, in_root, name)
                rejected_files.append({"name": name, "error": str(error)})
                continue
            if frame is not None:
                frames.append(frame.withColumn(_FILE_INDEX, F.lit(len(files))))
            files.append(file)
        rows = tag_rows(frames, policy)
        counts = count_rows(rows)
        deduped = shuffle(drop_duplicates(valid_rows(rows, policy)), partitions, seed)
        with _work_dir(out_fs, out_root) as work:
            parts = write_parts(deduped, work, partitions)
            rejected_sample = write_rejected_sample(rows, files, work)
            by_reason: dict[str, int] = {}
            for (_, reason), n in counts.items():
                if reason is not None:
                    by_reason[reason] = by_reason.get(reason, 0) + n
            stats = {
                "rows_in": sum(counts.values()),
                "rows_invalid": sum(by_reason.values()),
                "rows_invalid_by_reason": dict(sorted(by_reason.items())),
                "captions_truncated": count_truncated(rows, policy),
                "rows_out": sum(pq.read_metadata(part).num_rows for part in parts),
                "partitions": partitions,
                "seed": seed,
                "policy": asdict(policy),
                "parts": [part_name(index) for index in range(partitions)],
                "files": [
                    {
                        "name": f.name,
                        "rows": sum(n for (i, _), n in counts.items() if i == index),
                        "format": f.format,
                        "delimiter": f.delimiter,
                    }
                    for index, f in enumerate(files)
                ],
                "files_rejected": rejected_files,
                "input_fingerprint": input_fingerprint([(n, size) for n, size in listing if n not in {r["name"] for r in rejected_files}]),
                "seconds": round(time.monotonic() - started, 3),
            }
            publish(out_fs, out_root, parts, rejected_sample)
            storage.write_json(storage.join(output_url, STATS_FILE), stats)  # last: marks the output complete
    log.info(
        "Dedup wrote %d of %d rows (%d invalid) to %s in %d parts",
        stats["rows_out"], stats["rows_in"], stats["rows_invalid"], output_url, partitions,
    )  # fmt: skip
    return stats


def current_output(
    input_url: str,
    output_url: str,
    partitions: int,
    seed: int,
    policy: RowPolicy,
    listing: Sequence[tuple[str, int]] | None = None,
) -> dict[str, Any] | None:
    """The ``_stats.json`` under ``output_url`` when it was made from exactly this input and
    these settings (so the dedup has nothing to do), else None."""
    if listing is None:
        fs, root = fsspec.core.url_to_fs(input_url)
        listing = list_input_files(fs, root, input_url)
    fingerprint = input_fingerprint(listing)
    previous = storage.read_json_or_none(storage.join(output_url, STATS_FILE))
    if previous is None:
        return None
    done = (previous.get("input_fingerprint"), previous.get("partitions"), previous.get("seed"), previous.get("policy"))
    if done != (fingerprint, partitions, seed, asdict(policy)):
        log.info("Redoing dedup: %s/%s was made from other input or settings", output_url, STATS_FILE)
        return None
    log.info(
        "Skipping dedup: %s/%s already records input fingerprint %s, %d partitions, seed %d",
        output_url, STATS_FILE, fingerprint[:12], partitions, seed,
    )  # fmt: skip
    return previous


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
            empty = not header.strip() and not handle.read(1 << 16).strip()
        if empty:
            return InputFile(name, source, local_path, "empty", None)
        if "\x00" in header or not header.strip():
            raise ValueError("no text header row")
    except (OSError, EOFError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise DedupInputError(
            f"input file {source} is neither CSV nor parquet (columns: none, {error}); "
            "expected a CSV with a header row or a parquet file"
        ) from error
    return InputFile(name, source, local_path, "csv", sniff_delimiter(header), header)


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


def read_file(spark: SparkSession, file: InputFile) -> DataFrame | None:
    """One input file as a DataFrame with REFERENCE_SCHEMA and ``_malformed``; None when empty."""
    if file.format == "empty":
        log.info("Input file %s is empty", file.source)
        return None
    path = "file://" + os.path.abspath(file.local_path)
    if file.format == "parquet":
        return align_to_reference(spark.read.parquet(path), file.source, F.lit(False).alias(_MALFORMED))
    # The header's own columns, all strings, plus Spark's corrupt-record column: a row with
    # too few or too many fields is kept there instead of being silently padded or cut.
    names = next(csv.reader([file.header or ""], delimiter=file.delimiter or ","))
    names = [n.strip().lstrip("\ufeff") or f"_c{i}" for i, n in enumerate(names)]
    schema = StructType([StructField(n, StringType()) for n in names] + [StructField(_CORRUPT, StringType())])
    # multiLine: quoted captions may hold the delimiter or newlines.
    options = {"header": True, "sep": file.delimiter, "quote": '"', "escape": '"', "mode": "PERMISSIVE"}
    frame = spark.read.csv(path, multiLine=True, schema=schema, columnNameOfCorruptRecord=_CORRUPT, **options)
    return align_to_reference(frame, file.source, F.col(_CORRUPT).isNotNull().alias(_MALFORMED))


def align_to_reference(frame: DataFrame, source: str, *extra: Column) -> DataFrame:
    """Rename, cast and order columns as REFERENCE_SCHEMA (missing ones become null), then ``extra``."""
    by_name = {
        column.strip().lstrip("\ufeff").lower(): column for column in reversed(frame.columns) if column != _CORRUPT
    }
    matched = {
        target: next((by_name[name] for name in names if name in by_name), None)
        for target, names in HEADER_NAMES.items()
    }
    if matched["URL"] is None:
        raise DedupInputError(
            f"input file {source} has no URL column (columns: {', '.join(c for c in frame.columns if c != _CORRUPT)}); "
            "expected a column named URL or url"
        )
    return frame.select(*[_cast(frame, matched[field.name], field) for field in REFERENCE_SCHEMA], *extra)


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


def tag_rows(frames: Sequence[DataFrame], policy: RowPolicy) -> DataFrame:
    """All input rows, each with its file index and ``_reason``: why it is invalid, or null."""
    if not frames:
        raise DedupInputError("no input file holds any row")
    rows = frames[0]
    for frame in frames[1:]:
        rows = rows.unionByName(frame)
    url, text = F.col("URL"), F.col("TEXT")
    # Spark decodes invalid UTF-8 as U+FFFD, the replacement character.
    replaced = F.coalesce(url.contains("\ufffd"), F.lit(False)) | F.coalesce(text.contains("\ufffd"), F.lit(False))
    reason = (
        F.when(url.isNull() | (F.trim(url) == ""), "missing_url")
        .when(~url.rlike("(?i)^https?://[^\\s/]+"), "non_http_url")
        .when(F.col(_MALFORMED), "wrong_column_count")
        .when(text.isNull() | (F.trim(text) == ""), "missing_caption")
        .when(replaced, "invalid_utf8")
    )
    if policy.long_captions == "reject":
        reason = reason.when(F.length(text) > policy.max_caption_length, "caption_too_long")
    return rows.withColumn(_REASON, reason)


def valid_rows(rows: DataFrame, policy: RowPolicy) -> DataFrame:
    """The rows without a reason, captions cut to the bound when the policy truncates."""
    valid = rows.where(F.col(_REASON).isNull())
    if policy.long_captions == "truncate":
        valid = valid.withColumn("TEXT", F.substring("TEXT", 1, policy.max_caption_length))
    return valid


def count_truncated(rows: DataFrame, policy: RowPolicy) -> int:
    if policy.long_captions != "truncate":
        return 0
    too_long = F.col(_REASON).isNull() & (F.length("TEXT") > policy.max_caption_length)
    return rows.where(too_long).count()


def count_rows(rows: DataFrame) -> dict[tuple[int, str | None], int]:
    """(file index, reason or None) -> rows."""
    counted = rows.groupBy(_FILE_INDEX, _REASON).count()
    return {(row[_FILE_INDEX], row[_REASON]): row["count"] for row in counted.collect()}


def write_rejected_sample(rows: DataFrame, files: Sequence[InputFile], work_dir: str) -> str:
    """Up to REJECTED_SAMPLE_PER_REASON rejected rows per reason, with their file, as parquet."""
    from pyspark.sql.window import Window

    rank = F.row_number().over(Window.partitionBy(_REASON).orderBy(_FILE_INDEX, "URL", "TEXT"))
    sample = (
        rows.where(F.col(_REASON).isNotNull())
        .withColumn("_rank", rank)
        .where(F.col("_rank") <= REJECTED_SAMPLE_PER_REASON)
        .select(
            F.col(_REASON).alias("reason"),
            _FILE_INDEX,
            F.substring("URL", 1, 2000).alias("URL"),
            F.substring("TEXT", 1, 2000).alias("TEXT"),
        )
        .toPandas()
    )
    sample.insert(1, "file", [files[i].name for i in sample.pop(_FILE_INDEX)])
    path = os.path.join(work_dir, "rejected.parquet")
    sample.sort_values(["reason", "file", "URL"], na_position="first").to_parquet(path, index=False)
    return path


def set_aside(fs: AbstractFileSystem, root: str, name: str) -> None:
    """Move a bad input file to ``<input>/_rejected/``, which later runs do not read."""
    fs.makedirs(f"{root}/{REJECTED_DIR}", exist_ok=True)
    fs.mv(f"{root}/{name}", f"{root}/{REJECTED_DIR}/{name}")


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


def publish(out_fs: AbstractFileSystem, out_root: str, parts: Sequence[str], rejected_sample: str) -> None:
    """Move (local) or upload (remote) the parts to their stable names and drop stale ones."""
    stats_path = f"{out_root}/{STATS_FILE}"
    if out_fs.exists(stats_path):
        out_fs.rm_file(stats_path)  # the output is incomplete until the new stats land
    out_fs.makedirs(f"{out_root}/{REJECTED_DIR}", exist_ok=True)
    moves = [(part, f"{out_root}/{Path(part).name}") for part in parts]
    moves.append((rejected_sample, f"{out_root}/{REJECTED_DIR}/{Path(rejected_sample).name}"))
    for local, destination in moves:
        if isinstance(out_fs, LocalFileSystem):
            os.replace(local, destination)
        else:
            out_fs.put_file(local, destination)
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
