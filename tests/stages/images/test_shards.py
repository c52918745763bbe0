"""Adding up img2dataset's shard stats."""

from __future__ import annotations

import json
from pathlib import Path

from stages.images.shards import finished_shard_ids, summarize_shards


def test_summarize_shards_adds_up_stats(tmp_path: Path) -> None:
    for part, shard, stats in [
        ("part-00000", "0000000000", {"count": 10, "successes": 8, "failed_to_download": 1, "failed_to_resize": 1,
                                      "status_dict": {"success": 8, "HTTP Error 404": 1, "Image decoding failed": 1}}),
        ("part-00001", "0000100000", {"count": 5, "successes": 5, "failed_to_download": 0, "failed_to_resize": 0,
                                      "status_dict": {"success": 5}}),
    ]:  # fmt: skip
        folder = tmp_path / part
        folder.mkdir()
        (folder / f"{shard}_stats.json").write_text(json.dumps(stats))
        (folder / f"{shard}.tar").write_bytes(b"x" * 1024)
    totals = summarize_shards(str(tmp_path))
    assert (totals["count"], totals["successes"], totals["failed_to_download"], totals["failed_to_resize"]) == (15, 13, 1, 1)
    assert totals["errors"] == {"HTTP Error 404": 1, "Image decoding failed": 1}
    assert totals["bytes"] == 2048 and len(totals["shards"]) == 2

    only_first = summarize_shards(str(tmp_path), ["part-00000"])
    assert [s["shard"] for s in only_first["shards"]] == ["part-00000/0000000000"] and only_first["count"] == 10
    assert finished_shard_ids(str(tmp_path / "part-00001")) == {100_000}
