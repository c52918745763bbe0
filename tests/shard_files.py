"""What the pipeline tests read back from a dataset's files: samples in its shards, and a
folder's files with their modification times."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path


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
