"""What the pipeline tests read back from a dataset's files: samples in its shards, and a
folder's files with their modification times."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.layout import RunLayout


def samples(output: Path) -> list[tuple[str, str]]:
    """(url, caption) of every sample in the dataset's shards, once per sample, sorted."""
    found = []
    for tar in sorted((output / "images").glob("part-*/*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(archive.extractfile(member))
                    found.append((meta["url"], meta["caption"]))
    return sorted(found)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def mark_embedded(layout: "RunLayout", count: int, *, dim: int = 512, device: str = "cpu", clip_model: str = "m") -> None:
    """Each current part's embeddings marked done, as its clip_embeddings task marks them
    after a model ran (none runs here): the first part holds ``count`` embeddings, the others none."""
    from stages.embeddings import fingerprint

    for i, part in enumerate(layout.current_parts()):
        n = count if i == 0 else 0
        numbers = {"part": part, "count": n, "text_count": n, "dim": dim, "device": device, "partitions": 1,
                   "partitions_computed": 1, "compute_seconds": 1.0, "samples_per_second": float(n) or None}  # fmt: skip
        layout.part_embeddings_marker(part).mark_done({"input_fingerprint": fingerprint(layout.current_shards([part])), "clip_model": clip_model}, numbers)
