"""Taking a batch back out of a dataset: its rows, shards, embeddings and (at the next
build_index) vectors, without touching the other batches'.

The dedup marker is rewritten first: from then on the batch is not in the dataset, and its
raw files are listed as removed, so later runs leave them out while they stay unchanged.
Its files are then deleted; a removal killed half-way is finished by running it again.
build_index then re-adds the remaining vectors to the trained index (no retraining).
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.dedup.batches import key_folder, without_batch
from stages.embedding_plans import drop_parts
from stages.layout import RunLayout

log = logging.getLogger(__name__)


def remove_batch(layout: RunLayout, batch: int) -> dict[str, Any]:
    """Remove batch ``batch`` from the dataset at ``layout``; its numbers."""
    stats = layout.dedup_stats()
    live = {b["batch"]: b for b in stats.get("batches", [])}
    removed = {b["batch"]: b for b in stats.get("removed_batches", [])}
    if batch in live:
        gone = live[batch]
        layout.dedup_marker.mark_done({}, without_batch(stats, batch))  # first: the batch leaves the dataset
        log.info("Batch %d (%s) is out of the dataset: removing its %d parts", batch, ", ".join(gone["files"]), len(gone["parts"]))
    elif batch in removed:
        gone = removed[batch]
        log.info("Batch %d was removed already: finishing the removal of its files", batch)
    else:
        raise ValueError(f"the dataset at {layout.output_root} has no batch {batch} (batches: {sorted(live) or 'none'})")
    parts = {p.split(".")[0] for p in gone["parts"]}
    embeddings = drop_parts(layout, parts) or {}
    for part in sorted(parts):
        fs, path = url_to_fs(layout.part_images(part))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        if storage.exists(layout.part(part)):
            storage.remove(layout.part(part))
    fs, path = url_to_fs(layout.dedup)
    keys = posixpath.join(path, key_folder(batch))
    if fs.exists(keys):
        fs.rm(keys, recursive=True)
    return {
        "batch": batch,
        "files": gone["files"],
        "parts_removed": len(parts),
        "rows_removed": gone["rows_out"],
        "embedding_partitions_removed": embeddings.get("partitions_removed", 0),
        "rows_out": layout.dedup_stats()["rows_out"],
    }
