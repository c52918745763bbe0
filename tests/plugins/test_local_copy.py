"""A remote index is copied to a local cache once per version (plugins/laion_search/reader.py
local_copy), on a moto S3 server (moto's server mode, as s3fs tests itself)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import pytest
from laion_search.reader import local_copy

from moto_s3 import moto_bucket


def test_a_remote_file_is_copied_once_per_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_bucket(monkeypatch, f"copy-{uuid.uuid4().hex[:12]}") as bucket:
        fs = fsspec.filesystem("s3")
        url = f"s3://{bucket}/run/index/image.index"
        fs.pipe_file(f"{bucket}/run/index/image.index", b"first version")
        cache = tmp_path / "cache"

        first = local_copy(url, str(cache))
        assert Path(first).read_bytes() == b"first version" and Path(first).is_relative_to(cache)
        os.utime(first, (1, 1))  # a second copy would be written anew: its times would change
        assert local_copy(url, str(cache)) == first and os.stat(first).st_mtime == 1  # a restart reuses the copy

        fs.pipe_file(f"{bucket}/run/index/image.index", b"second, longer version")  # published again
        second = local_copy(url, str(cache))
        assert second != first and Path(second).read_bytes() == b"second, longer version"
        assert sorted(p.name for p in Path(second).parent.iterdir()) == [Path(second).name]  # the old copy removed

        with pytest.raises(FileNotFoundError):
            local_copy(f"s3://{bucket}/missing/image.index", str(cache))
        assert not list(cache.rglob("*.partial"))


def test_a_killed_download_leaves_no_copy_under_the_final_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_bucket(monkeypatch, f"copy-{uuid.uuid4().hex[:12]}") as bucket:
        fs = fsspec.filesystem("s3")
        fs.pipe_file(f"{bucket}/image.index", b"x" * 1000)

        def failing_get_file(rpath: str, lpath: str, **kwargs: object) -> None:  # the connection drops mid-copy
            Path(lpath).write_bytes(b"x" * 10)
            raise ConnectionError("connection reset")

        monkeypatch.setattr(fs, "get_file", failing_get_file)  # the instance local_copy gets (fsspec caches it)
        with pytest.raises(ConnectionError):
            local_copy(f"s3://{bucket}/image.index", str(tmp_path))
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
