"""Dedup stage: raw LAION metadata files in, N shuffled parquet parts out.

Every CSV or parquet file in the input folder is read on its own, aligned to the
reference columns, stripped of rows without an http(s) URL and of exact (URL, TEXT)
duplicates, shuffled by a seeded hash and written as `part-00000.parquet` ...
`part-{N-1}.parquet`. The completion marker (`_stats.json`) is written last: the output is
complete exactly when it exists, and a rerun over the same input and settings is skipped.

settings (:class:`~stages.dedup.settings.DedupSettings`), inputs (the input folder's
files), rows (the Spark work), outputs (parts, publishing, the marker), job (the Spark
application that spark-submit runs).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import fsspec

from stages.dedup.settings import DedupSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def run(spark: SparkSession, input_url: str, output_url: str, settings: DedupSettings, seed: int = 0) -> dict[str, Any]:
    """Deduplicate every file under `input_url` into ``settings.dedup_partitions`` parts under `output_url`.

    Both URLs may be local paths, file:// or any fsspec URL such as s3://bucket/prefix.
    Returns the stats the output's marker records (or already recorded, when skipped).
    """
    # Imported here, not above: the DAG file imports DedupSettings from this package, and
    # parsing it must not load Spark.
    from stages.dedup import inputs, outputs, rows

    started = time.monotonic()
    in_fs, in_root = fsspec.core.url_to_fs(input_url)
    out_fs, out_root = fsspec.core.url_to_fs(output_url)
    done = outputs.marker(output_url)
    listing = inputs.list_input_files(in_fs, in_root, input_url)
    previous = outputs.current_output(input_url, done, settings, seed, listing)
    if previous is not None:
        return previous

    policy, partitions = settings.policy, settings.dedup_partitions
    with inputs.local_input_dir(in_fs, in_root, listing) as input_dir:
        files, frames, rejected_files = [], [], []
        for name, _ in listing:
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
        tagged = rows.tag_rows(frames, policy)
        counts = rows.count_rows(tagged)
        deduped = rows.shuffle(rows.drop_duplicates(rows.valid_rows(tagged, policy)), partitions, seed)
        with outputs.work_dir(out_fs, out_root) as work:
            parts = outputs.write_parts(deduped, work, partitions)
            rejected_sample = outputs.write_rejected_sample(rows.rejected_sample(tagged, files), work)
            by_reason: dict[str, int] = {}
            for (_, reason), n in counts.items():
                if reason is not None:
                    by_reason[reason] = by_reason.get(reason, 0) + n
            numbers = {
                "rows_in": sum(counts.values()),
                "rows_invalid": sum(by_reason.values()),
                "rows_invalid_by_reason": dict(sorted(by_reason.items())),
                "captions_truncated": rows.count_truncated(tagged, policy),
                "rows_out": outputs.count_part_rows(parts),
                "parts": [outputs.part_name(index) for index in range(partitions)],
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
                "seconds": round(time.monotonic() - started, 3),
            }
            outputs.publish(out_fs, out_root, parts, rejected_sample, done)
            # The files set aside are no longer listed: a rerun finds this output current.
            kept = [(n, size) for n, size in listing if n not in {r["name"] for r in rejected_files}]
            stats = done.mark_done(outputs.made_from(kept, settings, seed), numbers)  # last: marks the output complete
    log.info(
        "Dedup wrote %d of %d rows (%d invalid) to %s in %d parts",
        stats["rows_out"], stats["rows_in"], stats["rows_invalid"], output_url, partitions,
    )  # fmt: skip
    return stats
