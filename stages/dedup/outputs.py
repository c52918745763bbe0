"""The dedup's output folder: parts written in a work folder, published under stable names,
and the completion marker that records what they were made from.

No Spark here: the operator asks :func:`current_output` before deciding to submit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from stages import storage
from stages.dedup.inputs import REJECTED_DIR, input_fingerprint, list_input_files
from stages.dedup.settings import DedupSettings
from stages.layout import DEDUP_MARKER, Marker

if TYPE_CHECKING:
    import pandas
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

REJECTED_SAMPLE = "rejected.parquet"


def marker(output_url: str) -> Marker:
    """The completion marker of a dedup output folder (a run's is ``RunLayout.dedup_marker``)."""
    return Marker(storage.join(output_url, DEDUP_MARKER))


def made_from(listing: Sequence[tuple[str, int]], settings: DedupSettings, seed: int) -> dict[str, Any]:
    """What an output records it was made from: the same again makes the same parts."""
    return {
        "input_fingerprint": input_fingerprint(listing),
        "partitions": settings.dedup_partitions,
        "seed": seed,
        "policy": asdict(settings.policy),
    }


def current_output(
    input_url: str,
    done: Marker,
    settings: DedupSettings,
    seed: int,
    listing: Sequence[tuple[str, int]] | None = None,
) -> dict[str, Any] | None:
    """The stats recorded by ``done`` when its output was made from exactly the files under
    ``input_url`` (``listing``, when already listed) and these settings, else None."""
    if listing is None:
        fs, root = fsspec.core.url_to_fs(input_url)
        listing = list_input_files(fs, root, input_url)
    inputs = made_from(listing, settings, seed)
    stats = done.done_with(inputs)
    if stats is None:
        if storage.exists(done.url):
            log.info("Redoing dedup: %s was made from other input or settings", done.url)
        return None
    log.info(
        "Skipping dedup: %s already records input fingerprint %s, %d partitions, seed %d",
        done.url, inputs["input_fingerprint"][:12], settings.dedup_partitions, seed,
    )  # fmt: skip
    return stats


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


def count_part_rows(parts: Sequence[str]) -> int:
    return sum(pq.read_metadata(part).num_rows for part in parts)


def write_rejected_sample(sample: pandas.DataFrame, work_dir: str) -> str:
    path = os.path.join(work_dir, REJECTED_SAMPLE)
    sample.to_parquet(path, index=False)
    return path


def publish(out_fs: AbstractFileSystem, out_root: str, parts: Sequence[str], rejected_sample: str, done: Marker) -> None:
    """Move (local) or upload (remote) the parts to their stable names and drop stale ones."""
    done.clear()  # the output is incomplete until the new marker lands
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
