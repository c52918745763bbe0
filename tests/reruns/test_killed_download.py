"""SIGKILL the download stage in the middle of a shard, then rerun it: only unfinished
shards are redone and no partial file is ever visible under a final name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd

from sampleweb.hostile import HostileServer
from waiting import wait_until

DOWNLOAD = """
import sys
from stages.images.download import DownloadSettings, download_part
from stages.images.safe_fetch import FetchPolicy
policy = FetchPolicy(allowed_networks=("127.0.0.0/8",), max_download_seconds=float(sys.argv[3]))
settings = DownloadSettings(processes_count=1, thread_count=4, number_sample_per_shard=10, timeout=30, fetch_policy=policy)
download_part(sys.argv[1], sys.argv[2], settings, dedup_version="v1")
"""


def stats_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*_stats.json"))


def test_a_killed_download_redoes_only_its_unfinished_shard(tmp_path: Path) -> None:
    with HostileServer(trickle_seconds=120) as server:
        urls = [server.url(f"/good.jpg?n={i}") for i in range(20)] + [server.url("/trickle.jpg")]
        urls += [server.url(f"/good.jpg?n={i}") for i in range(20, 29)]
        part = tmp_path / "part-00000.parquet"
        n = len(urls)
        rows = {"SAMPLE_ID": range(n), "URL": urls, "TEXT": [f"c{i}" for i in range(n)]}
        pd.DataFrame({**rows, "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}).to_parquet(part)
        images = tmp_path / "images"
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        worker = subprocess.Popen(
            [sys.executable, "-c", DOWNLOAD, str(part), str(images), "120"], env=env, start_new_session=True
        )
        try:
            # Shards 0 and 1 are done; shard 2 is written in _partial/ and hangs on the trickle.
            wait_until(
                lambda: len(stats_files(images)) == 2 and server.requests["/trickle.jpg"] == 1
                and any((images / "_partial").glob("0000000002.*")),
                "shard 2 started and hanging on /trickle.jpg", process=worker,
            )  # fmt: skip
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        assert stats_files(images) == ["0000000000_stats.json", "0000000001_stats.json"]
        # Nothing half-written under a final name: every tar has its stats, partial ones sit in _partial/.
        assert sorted(p.stem for p in images.glob("*.tar")) == ["0000000000", "0000000001"]
        assert list((images / "_partial").glob("0000000002.*"))
        before = dict(server.requests_by_url)

        subprocess.run([sys.executable, "-c", DOWNLOAD, str(part), str(images), "2"], env=env, check=True, timeout=300)
        after = server.requests_by_url

    assert stats_files(images) == [f"000000000{i}_stats.json" for i in range(3)]
    assert not list((images / "_partial").iterdir())
    # Shards 0 and 1 (URLs n=0..19) were not requested again; shard 2's were.
    assert all(after[f"/good.jpg?n={i}"] == before[f"/good.jpg?n={i}"] for i in range(20))
    assert all(after[f"/good.jpg?n={i}"] > before.get(f"/good.jpg?n={i}", 0) for i in range(20, 29))
    keys = []
    for tar in sorted(images.glob("*.tar")):
        with tarfile.open(tar) as archive:
            keys += [m.name.split(".")[0] for m in archive.getmembers() if m.name.endswith(".jpg")]
    assert len(keys) == len(set(keys)) == 29
    stats = [json.loads(p.read_text()) for p in sorted(images.glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == 29
    assert sum(s["status_dict"].get("download_time_limit", 0) for s in stats) == 1
