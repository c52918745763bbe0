"""The dedup's output folder: a batch's parts and keys written in a work folder, published
under stable names, and the completion marker that records every batch.

No Spark here: the operator asks :func:`current_output` before deciding to submit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from stages import storage
from stages.dedup.batches import KEYS_DIR, plan_batch
from stages.dedup.inputs import REJECTED_DIR, list_input_files
from stages.layout import DEDUP_MARKER, Marker

if TYPE_CHECKING:
    import pandas
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

REJECTED_SAMPLE = "rejected.parquet"


def marker(output_url: str) -> Marker:
    """The completion marker of a dedup output folder (a run's is ``RunLayout.dedup_marker``)."""
    return Marker(storage.join(output_url, DEDUP_MARKER))


def current_output(input_url: str, done: Marker, changed_raw_files: str = "fail") -> dict[str, Any] | None:
    """The stats recorded by ``done`` when every raw file under ``input_url`` is already in
    a batch of the dataset (nothing to do), else None. A recorded file that changed is a
    :class:`~stages.dedup.inputs.DedupInputError` (see :func:`~stages.dedup.batches.plan_batch`)."""
    fs, root = fsspec.core.url_to_fs(input_url)
    plan = plan_batch(fs, root, input_url, done.read(), list_input_files(fs, root, input_url), changed_raw_files)
    if plan.new_files:
        return None
    log.info("Skipping dedup: every raw file under %s is in one of the %d batches of %s", input_url, len(plan.earlier["batches"]), done.url)
    return plan.earlier


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_parts(rows: DataFrame, work_dir: str, partitions: int, first: int = 0) -> list[str]:
    """Write `rows` under `work_dir`; return exactly `partitions` local files, numbered from
    ``first`` (part-<first> first).

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
        part = os.path.join(work_dir, part_name(first + index))
        if index in written:
            os.replace(written[index], part)
        else:
            pq.write_table(schema.empty_table(), part)
        parts.append(part)
    return parts


def count_part_rows(parts: Sequence[str]) -> int:
    return sum(pq.read_metadata(part).num_rows for part in parts)


def write_rejected_sample(sample: pandas.DataFrame, work_dir: str) -> str:
    path = os.path.join(work_dir, REJECTED_SAMPLE)
    sample.to_parquet(path, index=False)
    return path


def write_keys(keys: DataFrame, work_dir: str) -> list[str]:
    """Write a batch's row keys under ``work_dir``; the local files, in name order."""
    spark_dir = os.path.join(work_dir, "keys")
    keys.write.parquet("file://" + os.path.abspath(spark_dir))
    return [str(path) for path in sorted(Path(spark_dir).glob("part-*.parquet"))]


@contextlib.contextmanager
def local_keys(out_fs: AbstractFileSystem, out_root: str, folders: Sequence[str]) -> Iterator[list[str]]:
    """Local paths of every key file in ``folders`` (names under ``out_root``), for Spark:
    the files themselves when local, else a temporary copy."""
    remote = [f for folder in folders for f in sorted(out_fs.glob(f"{out_root}/{folder}/*.parquet"))]
    if isinstance(out_fs, LocalFileSystem):
        yield remote
        return
    staging = tempfile.mkdtemp(prefix="dedup-keys-")
    try:
        local = []
        for i, path in enumerate(remote):
            local.append(os.path.join(staging, f"{i:06d}.parquet"))
            out_fs.get_file(path, local[-1])
        yield local
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(
    out_fs: AbstractFileSystem,
    out_root: str,
    parts: Sequence[str],
    keys: Sequence[str],
    key_folder: str,
    rejected_sample: str | None,
    *,
    fresh: bool,
) -> None:
    """Move (local) or upload (remote) a batch's parts and keys to their stable names.

    Earlier batches' files are left as they are; a ``fresh`` dataset (the first batch) drops
    every other part. Files of a batch that was never recorded (a killed run) have the
    same names as the rerun's, which replaces them.
    """
    out_fs.makedirs(f"{out_root}/{REJECTED_DIR}", exist_ok=True)
    keys_root = f"{out_root}/{key_folder}"
    if out_fs.exists(keys_root):
        out_fs.rm(keys_root, recursive=True)
    out_fs.makedirs(keys_root, exist_ok=True)
    moves = [(part, f"{out_root}/{Path(part).name}") for part in parts]
    moves += [(key, f"{keys_root}/part-{i:05d}.parquet") for i, key in enumerate(keys)]
    if rejected_sample is not None:  # the latest batch's sample of rejected rows
        moves.append((rejected_sample, f"{out_root}/{REJECTED_DIR}/{Path(rejected_sample).name}"))
    for local, destination in moves:
        if isinstance(out_fs, LocalFileSystem):
            os.replace(local, destination)
        else:
            out_fs.put_file(local, destination)
    if fresh:
        names = {Path(part).name for part in parts}
        for stale in out_fs.glob(f"{out_root}/part-*.parquet"):
            if Path(stale).name not in names:
                out_fs.rm_file(stale)
        for stale in out_fs.glob(f"{out_root}/{KEYS_DIR}/*"):
            if posixpath.basename(stale) != posixpath.basename(key_folder):
                out_fs.rm(stale, recursive=True)


@contextlib.contextmanager
def work_dir(out_fs: AbstractFileSystem, out_root: str) -> Iterator[str]:
    """`<output>/_tmp-<uuid>/` for a local output (so parts move by rename), else a local temp folder."""
    local = isinstance(out_fs, LocalFileSystem)
    parent = out_root if local else tempfile.mkdtemp(prefix="dedup-output-")
    work = os.path.join(parent, f"_tmp-{uuid.uuid4().hex}")
    os.makedirs(work)
    try:
        yield work
    finally:
        shutil.rmtree(work if local else parent, ignore_errors=True)
