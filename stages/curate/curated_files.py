"""The curated folders' files: one name per partition and selection of kept rows, and the
removal of a removed batch's curation files."""

from __future__ import annotations

import hashlib
import posixpath
import re

from stages import storage
from stages.layout import RunLayout

KINDS = ("img_emb", "text_emb", "metadata")

# A curated file's name: clip-retrieval's, plus a digest of the rows it keeps. A changed
# selection is a new name (the index sees a new file, never one of the same name and size
# with other rows), and names still sort by partition, the index's row order.
CURATED_NAME = re.compile(r"^(img_emb|text_emb|metadata)_(.+)-([0-9a-f]{12})\.(npy|parquet)$")


def selection_digest(kept_keys: list[str], clip_model: str | None) -> str:
    return hashlib.sha256("\n".join([str(clip_model), *kept_keys]).encode()).hexdigest()[:12]


def curated_name(kind: str, partition: str, digest: str) -> str:
    return f"{kind}_{partition}-{digest}.{'parquet' if kind == 'metadata' else 'npy'}"


def curated_files_of(layout: RunLayout, partition: str | None = None) -> list[str]:
    """The curated files (every kind) of ``partition``, or of every partition."""
    found = []
    for kind in KINDS:
        for url in storage.list_files(layout.curated_files(kind), f"{kind}_*"):
            match = CURATED_NAME.match(posixpath.basename(url))
            if match and (partition is None or match.group(2) == partition):
                found.append(url)
    return found


def remove_stale(layout: RunLayout, partitions: list[str]) -> int:
    """Remove the curation files of partitions no longer embedded (a removed batch); how many partitions."""
    current, stale = set(partitions), set()
    for url in storage.list_files(storage.join(layout.curation, "decisions"), "decisions_*.parquet"):
        name = posixpath.basename(url)[len("decisions_") : -len(".parquet")]
        if name not in current:
            storage.remove(url)
            stale.add(name)
    for url in curated_files_of(layout):
        name = CURATED_NAME.match(posixpath.basename(url)).group(2)
        if name not in current:
            storage.remove(url)
            stale.add(name)
    return len(stale)
