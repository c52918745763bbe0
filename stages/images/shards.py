"""Adding up img2dataset's per-shard stats: a part's numbers, or a run's."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.images.parts import RETRY_REASON, is_retry_shard
from stages.layout import SHARD_STATS_SUFFIX

STATS_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize")


def summarize_shards(folder: str, parts: list[str] | None = None) -> dict[str, Any]:
    """Add up the shard stats files under ``folder``.

    With ``parts``, only the shards of those part folders count (``folder/<part>/``).
    """
    fs, path = url_to_fs(folder)
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    shards, tar_bytes = [], 0
    subfolders = ["**"] if parts is None else parts
    patterns = [posixpath.join(path, sub, "*" + SHARD_STATS_SUFFIX) for sub in subfolders]
    for stats_path in sorted(f for pattern in patterns for f in fs.glob(pattern)):
        with fs.open(stats_path, "r") as f:
            stats = json.load(f)
        for key in STATS_KEYS:
            totals[key] += int(stats.get(key, 0))
        errors.update({str(k): int(v) for k, v in stats.get("status_dict", {}).items() if k != "success"})
        stem = stats_path[: -len(SHARD_STATS_SUFFIX)]
        retried = is_retry_shard(stem) and _retried_reasons(fs, stem + ".parquet")
        if retried:
            # Each sample of a retry shard replaces one transient failure counted before.
            totals["count"] -= len(retried)
            totals["failed_to_download"] -= len(retried)
            errors.subtract(retried)
        size = fs.size(stem + ".tar") if fs.exists(stem + ".tar") else 0
        tar_bytes += size
        shards.append(
            {
                "shard": posixpath.relpath(stem, path),
                "count": int(stats.get("count", 0)),
                "successes": int(stats.get("successes", 0)),
                "bytes": size,
                "seconds": stats.get("duration"),
                **({"retried": len(retried)} if retried else {}),
            }
        )
    errors = +errors  # drop reasons no sample has any more
    return {**{k: totals[k] for k in STATS_KEYS}, "errors": dict(errors), "shards": shards, "bytes": tar_bytes}


def finished_shard_ids(output_folder: str) -> set[int]:
    """The ids of the shards of a part folder that img2dataset finished."""
    found = storage.list_files(output_folder, "*" + SHARD_STATS_SUFFIX)
    return {int(posixpath.basename(f)[: -len(SHARD_STATS_SUFFIX)]) for f in found}


def _retried_reasons(fs: Any, parquet: str) -> list[str]:
    """The earlier failure reason of each sample in a retry shard's parquet."""
    import pyarrow.parquet as pq

    with fs.open(parquet, "rb") as f:
        return [str(r) for r in pq.read_table(f, columns=[RETRY_REASON]).column(RETRY_REASON).to_pylist()]
