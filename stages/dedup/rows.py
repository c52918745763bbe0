"""The dedup's rows in Spark: input files aligned to the reference columns, each row tagged
valid or with the reason it is not, one row kept per (URL, TEXT), a seeded shuffle."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

from stages.dedup.inputs import DedupInputError, InputFile
from stages.dedup.settings import RowPolicy

if TYPE_CHECKING:
    import pandas

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
DEDUP_KEY = ("URL", "TEXT")
REJECTED_SAMPLE_PER_REASON = 100
# Working columns beside the reference ones.
FILE_INDEX = "_file_index"  # the row's file, by its index in the sorted listing
REASON = "_reason"  # why the row is invalid, null when it is valid
MALFORMED = "_malformed"
CORRUPT = "_corrupt_record"


def read_file(spark: SparkSession, file: InputFile, file_index: int) -> DataFrame | None:
    """One input file as a DataFrame with REFERENCE_SCHEMA, ``_malformed`` and ``_file_index``;
    None when empty. A file without a URL column fails here, before any output."""
    if file.format == "empty":
        log.info("Input file %s is empty", file.source)
        return None
    path = "file://" + os.path.abspath(file.local_path)
    index = F.lit(file_index).alias(FILE_INDEX)
    if file.format == "parquet":
        return align_to_reference(spark.read.parquet(path), file.source, F.lit(False).alias(MALFORMED), index)
    # The header's own columns, all strings, plus Spark's corrupt-record column: a row with
    # too few or too many fields is kept there instead of being silently padded or cut.
    names = next(csv.reader([file.header or ""], delimiter=file.delimiter or ","))
    names = [n.strip().lstrip("\ufeff") or f"_c{i}" for i, n in enumerate(names)]
    schema = StructType([StructField(n, StringType()) for n in names] + [StructField(CORRUPT, StringType())])
    # multiLine: quoted captions may hold the delimiter or newlines.
    options = {"header": True, "sep": file.delimiter, "quote": '"', "escape": '"', "mode": "PERMISSIVE"}
    frame = spark.read.csv(path, multiLine=True, schema=schema, columnNameOfCorruptRecord=CORRUPT, **options)
    return align_to_reference(frame, file.source, F.col(CORRUPT).isNotNull().alias(MALFORMED), index)


def align_to_reference(frame: DataFrame, source: str, *extra: Column) -> DataFrame:
    """Rename, cast and order columns as REFERENCE_SCHEMA (missing ones become null), then ``extra``."""
    by_name = {
        column.strip().lstrip("\ufeff").lower(): column for column in reversed(frame.columns) if column != CORRUPT
    }
    matched = {
        target: next((by_name[name] for name in names if name in by_name), None)
        for target, names in HEADER_NAMES.items()
    }
    if matched["URL"] is None:
        raise DedupInputError(
            f"input file {source} has no URL column (columns: {', '.join(c for c in frame.columns if c != CORRUPT)}); "
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
        .when(F.col(MALFORMED), "wrong_column_count")
        .when(text.isNull() | (F.trim(text) == ""), "missing_caption")
        .when(replaced, "invalid_utf8")
    )
    if policy.long_captions == "reject":
        reason = reason.when(F.length(text) > policy.max_caption_length, "caption_too_long")
    return rows.withColumn(REASON, reason)


def valid_rows(rows: DataFrame, policy: RowPolicy) -> DataFrame:
    """The rows without a reason, captions cut to the bound when the policy truncates."""
    valid = rows.where(F.col(REASON).isNull())
    if policy.long_captions == "truncate":
        valid = valid.withColumn("TEXT", F.substring("TEXT", 1, policy.max_caption_length))
    return valid


def count_truncated(rows: DataFrame, policy: RowPolicy) -> int:
    if policy.long_captions != "truncate":
        return 0
    too_long = F.col(REASON).isNull() & (F.length("TEXT") > policy.max_caption_length)
    return rows.where(too_long).count()


def count_rows(rows: DataFrame) -> dict[tuple[int, str | None], int]:
    """(file index, reason or None) -> rows."""
    counted = rows.groupBy(FILE_INDEX, REASON).count()
    return {(row[FILE_INDEX], row[REASON]): row["count"] for row in counted.collect()}


def rejected_sample(rows: DataFrame, files: Sequence[InputFile]) -> pandas.DataFrame:
    """Up to REJECTED_SAMPLE_PER_REASON rejected rows per reason, with their file name."""
    from pyspark.sql.window import Window

    rank = F.row_number().over(Window.partitionBy(REASON).orderBy(FILE_INDEX, "URL", "TEXT"))
    sample = (
        rows.where(F.col(REASON).isNotNull())
        .withColumn("_rank", rank)
        .where(F.col("_rank") <= REJECTED_SAMPLE_PER_REASON)
        .select(
            F.col(REASON).alias("reason"),
            FILE_INDEX,
            F.substring("URL", 1, 2000).alias("URL"),
            F.substring("TEXT", 1, 2000).alias("TEXT"),
        )
        .toPandas()
    )
    sample.insert(1, "file", [files[i].name for i in sample.pop(FILE_INDEX)])
    return sample.sort_values(["reason", "file", "URL"], na_position="first")


def drop_duplicates(rows: DataFrame) -> DataFrame:
    """One row per (URL, TEXT).

    The kept row is chosen by value (first file by name, then a present and smallest
    SAMPLE_ID, then the other columns), so a rerun keeps the same row however Spark
    happens to split the input.
    """
    others = [field.name for field in REFERENCE_SCHEMA if field.name not in DEDUP_KEY]
    rank = [F.col(FILE_INDEX), F.col("SAMPLE_ID").isNull().alias("_no_id"), *others]
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


KEY = "_key"  # 16 bytes naming a row's (URL, TEXT): the md5 of both, the URL's length first


def with_key(rows: DataFrame) -> DataFrame:
    """``rows`` with their :data:`KEY` column.

    The URL's length in front keeps ("ab", "c") and ("a", "bc") apart; 128 bits keep
    400M keys apart (the chance of one collision is about 1e-22).
    """
    named = F.concat(F.length("URL").cast("string"), F.lit(":"), F.col("URL"), F.col("TEXT"))
    return rows.withColumn(KEY, F.unhex(F.md5(named.cast("binary"))))


def not_in(rows: DataFrame, keys: DataFrame) -> DataFrame:
    """The rows of ``rows`` (with :data:`KEY`) whose key is not among ``keys`` (a :data:`KEY` column).

    A left anti join: Spark compares the keys on its executors, none reach the driver.
    """
    return rows.join(keys.select(KEY), on=KEY, how="left_anti")
