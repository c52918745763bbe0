"""Dedup stage: raw LAION metadata files in, shuffled parquet parts out, one batch at a time.

A run reads the raw files no earlier run read (a batch), each on its own: aligned to the
reference columns, stripped of rows without an http(s) URL and of exact (URL, TEXT)
duplicates within the batch and against every earlier batch (by the keys each batch
keeps under ``keys/``), shuffled by a seeded hash and written as ``dedup_partitions`` new
parts numbered after the earlier ones. Earlier parts are never rewritten. The completion
marker (``_stats.json``, see :mod:`stages.dedup.batches`) is written last: a batch is in
the dataset exactly when it records it, and a rerun with no new raw file is skipped.

settings (:class:`~stages.dedup.settings.DedupSettings`), inputs (the input folder's
files), batches (which files each batch holds; totals), rows (the Spark work), outputs
(parts, keys, publishing), job (the Spark application that spark-submit runs).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.dedup.settings import DedupSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def run(spark: SparkSession, input_url: str, output_url: str, settings: DedupSettings, seed: int = 0) -> dict[str, Any]:
    """Deduplicate the raw files under ``input_url`` that no batch of ``output_url`` holds
    into ``settings.dedup_partitions`` new parts there.

    Both URLs may be local paths, file:// or any fsspec URL such as s3://bucket/prefix.
    Returns the stats the output's marker records (or already recorded, when skipped).
    """
    # Imported here, not above: the DAG file imports DedupSettings from this package, and
    # parsing it must not load Spark.
    from stages.dedup import batches, inputs, outputs, rows

    started = time.monotonic()
    in_fs, in_root = fsspec.core.url_to_fs(input_url)
    out_fs, out_root = fsspec.core.url_to_fs(output_url)
    done = outputs.marker(output_url)
    listing = inputs.list_input_files(in_fs, in_root, input_url)
    plan = batches.plan_batch(in_fs, in_root, input_url, done.read(), listing, settings.changed_raw_files)
    if not plan.new_files:
        log.info("Skipping dedup: every raw file under %s is in one of the batches of %s", input_url, done.url)
        return plan.earlier

    policy, partitions = settings.policy, settings.dedup_partitions
    with inputs.local_input_dir(in_fs, in_root, plan.new_files) as input_dir:
        files, frames, rejected_files = [], [], []
        for name, _ in plan.new_files:
            source = f"{input_url.rstrip('/')}/{name}"
            try:
                file = inputs.detect_file(name, source, os.path.join(input_dir, name))
                frame = rows.read_file(spark, file, file_index=len(files))
            except inputs.DedupInputError as error:
                if policy.bad_files == "fail":
                    raise
                log.warning("Moving %s aside to %s/: %s", source, inputs.REJECTED_DIR, error)
                inputs.set_aside(in_fs, in_root, name)
                rejected_files.append({"name": name, "error": str(error)})
                continue
            if frame is not None:
                frames.append(frame)
            files.append(file)
        if not frames and plan.earlier is None:
            raise inputs.DedupInputError("no input file holds any row")
        with outputs.work_dir(out_fs, out_root) as work, outputs.local_keys(out_fs, out_root, plan.key_folders) as earlier_keys:
            numbers: dict[str, Any] = {"rows_in": 0, "rows_invalid": 0, "rows_invalid_by_reason": {}, "captions_truncated": 0}
            parts, keys, rejected_sample = [], [], None
            counts: dict[tuple[int, str | None], int] = {}
            unique_count = 0
            if frames:
                tagged = rows.tag_rows(frames, policy)
                counts = rows.count_rows(tagged)
                unique = rows.with_key(rows.drop_duplicates(rows.valid_rows(tagged, policy))).persist()
                unique_count = unique.count()
                new = rows.not_in(unique, spark.read.parquet(*("file://" + k for k in earlier_keys))) if earlier_keys else unique
                if new.count():  # a batch of nothing new adds no part
                    parts = outputs.write_parts(rows.shuffle(new.drop(rows.KEY), partitions, seed), work, partitions, first=plan.first_part)
                    keys = outputs.write_keys(new.select(rows.KEY), work)
                rejected_sample = outputs.write_rejected_sample(rows.rejected_sample(tagged, files), work)
                unique.unpersist()
                by_reason: dict[str, int] = {}
                for (_, reason), n in counts.items():
                    if reason is not None:
                        by_reason[reason] = by_reason.get(reason, 0) + n
                numbers = {
                    "rows_in": sum(counts.values()),
                    "rows_invalid": sum(by_reason.values()),
                    "rows_invalid_by_reason": dict(sorted(by_reason.items())),
                    "captions_truncated": rows.count_truncated(tagged, policy),
                }
            rows_out = outputs.count_part_rows(parts)
            numbers.update(
                duplicates_of_earlier_batches=unique_count - rows_out,
                rows_out=rows_out,
                parts=[os.path.basename(part) for part in parts],
                files_rejected=rejected_files,
                seconds=round(time.monotonic() - started, 3),
            )
            sizes = dict(plan.new_files)
            file_entries = [
                {
                    "name": f.name,
                    "size": sizes[f.name],
                    "sha256": batches.sha256_of(LocalFileSystem(), f.local_path),
                    "modified": batches.modified(in_fs, f"{in_root}/{f.name}"),
                    "rows": sum(n for (i, _), n in counts.items() if i == index),
                    "format": f.format,
                    "delimiter": f.delimiter,
                }
                for index, f in enumerate(files)
            ]
            stats = batches.record_batch(plan, numbers, file_entries, settings, seed)
            outputs.publish(out_fs, out_root, parts, keys, batches.key_folder(plan.batch), rejected_sample, fresh=plan.earlier is None)
            done.mark_done({}, stats)  # last: the batch is in the dataset once the marker records it
    log.info(
        "Dedup batch %d: %d new unique rows of %d (%d invalid, %d already in earlier batches) in %d parts; %d rows in %d batches",
        plan.batch, numbers["rows_out"], numbers["rows_in"], numbers["rows_invalid"], numbers["duplicates_of_earlier_batches"],
        len(parts), stats["rows_out"], len(stats["batches"]),
    )  # fmt: skip
    return stats
