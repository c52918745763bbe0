"""The output's disk fills up in the middle of a shard: the download fails saying so and
where, nothing partial is left under a final name, and once space is freed a rerun ends
with what a clean run makes.

The full disk is a real one: a small tmpfs mounted as the output (this needs root, the
test is skipped without it), filled up to a chosen point by a filler file.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sampleweb.hostile import HostileServer
from stages.images.download import DownloadSettings, download_part
from stages.images.safe_fetch import FetchPolicy
from stages.storage import DiskFullError

SAMPLES, PER_SHARD = 90, 30  # three shards
SHARD_FILES = (".tar", ".parquet", "_stats.json")
PAGE = os.sysconf("SC_PAGE_SIZE")  # what tmpfs allocates by
SETTINGS = DownloadSettings(
    processes_count=1, thread_count=4, number_sample_per_shard=PER_SHARD, timeout=30,
    fetch_policy=FetchPolicy(allowed_networks=("127.0.0.0/8",), max_requests_per_second_per_host=0),
)  # fmt: skip


@contextmanager
def small_disk(mount_point: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mount_point`` for the block."""
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to mount a tmpfs to fill up")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (mounting needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # a file still open in it


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def on_disk(path: Path) -> int:
    return -(-path.stat().st_size // PAGE) * PAGE


def finished_shards(folder: Path) -> set[str]:
    return {p.name.removesuffix("_stats.json") for p in folder.glob("*_stats.json")}


def shard(folder: Path, name: str) -> dict[str, Any]:
    """What a shard holds, whatever order its samples were written in."""
    with tarfile.open(folder / f"{name}.tar") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    rows = pd.read_parquet(folder / f"{name}.parquet").sort_values("key")
    return {"members": members, "rows": rows[["key", "url", "status", "width", "height"]].to_dict("records")}


def numbers_of(download: dict[str, Any]) -> dict[str, Any]:
    return {k: download[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize", "errors", "bytes")}


def test_a_full_disk_fails_the_download_clearly_and_a_rerun_completes(tmp_path: Path) -> None:
    with HostileServer() as server, small_disk(tmp_path / "disk") as disk:
        part = tmp_path / "part-00000.parquet"
        urls = [server.url(f"/good.jpg?n={i}") for i in range(SAMPLES)]
        rows = {"SAMPLE_ID": range(SAMPLES), "URL": urls, "TEXT": [f"caption {i}" for i in range(SAMPLES)]}
        pd.DataFrame({**rows, "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}).to_parquet(part)

        # A clean run on the same disk: the reference, and how much room a download takes.
        clean = disk / "clean"
        free = free_bytes(disk)
        clean_numbers = download_part(str(part), str(clean), SETTINGS, dedup_version="v1")
        used = free - free_bytes(disk)
        shards = sorted(finished_shards(clean))
        assert len(shards) == SAMPLES // PER_SHARD
        last = sum(on_disk(clean / f"{shards[-1]}{suffix}") for suffix in SHARD_FILES)

        # Fill the disk so that all but about half of the last shard fits.
        room = used - last // 2 // PAGE * PAGE
        filler = disk / "filler"
        filler.write_bytes(bytes(free_bytes(disk) - room))
        images = disk / "images"
        with pytest.raises(DiskFullError) as failed:
            download_part(str(part), str(images), SETTINGS, dedup_version="v1")
        message = str(failed.value)
        assert failed.value.errno == errno.ENOSPC
        assert "is full" in message and str(images) in message, message

        finished = finished_shards(images)
        assert finished < set(shards), "the download should have stopped in a shard"
        stopped_in = min(set(shards) - finished)
        assert (images / "_partial" / f"{stopped_in}.tar").exists(), "it stopped in the middle of a shard"
        # Under final names only finished shards, each as the clean run made it.
        assert {p.name for p in images.iterdir() if p.is_file()} == {
            "_dedup_version.txt", *(f"{name}{suffix}" for name in finished for suffix in SHARD_FILES)
        }
        for name in finished:
            assert shard(images, name) == shard(clean, name)
        finished_urls = {row["url"] for name in finished for row in shard(images, name)["rows"]}

        requested = dict(server.requests_by_url)
        filler.unlink()
        numbers = download_part(str(part), str(images), SETTINGS, dedup_version="v1")
        again = {url: count - requested.get(url, 0) for url, count in server.requests_by_url.items()}

        assert numbers_of(numbers) == numbers_of(clean_numbers)
        assert finished_shards(images) == set(shards)
        assert sorted(p.name for p in images.iterdir() if p.is_file()) == sorted(p.name for p in clean.iterdir() if p.is_file())
        for name in shards:
            assert shard(images, name) == shard(clean, name)
        assert not list((images / "_partial").iterdir())
        # The shards finished before the disk filled up were kept, not downloaded again.
        assert not [url for url in finished_urls if again.get(url.removeprefix(server.url("")), 0)]
