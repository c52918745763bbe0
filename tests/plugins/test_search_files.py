"""What build_index publishes for search, and reading samples by byte range, locally and on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stages.search import RunIndex, SampleReader, publish_search_files

pytestmark = pytest.mark.heavy

SEARCH_FILES = ("index/offsets", "index/metadata", "index/_SEARCH.json")


def without_search_files(root: Path) -> None:
    for name in SEARCH_FILES:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_every_offset_points_at_its_member(search_run: dict, tar_samples: dict) -> None:
    import pyarrow.parquet as pq

    root = Path(search_run["output_root"])
    tables = sorted((root / "index" / "offsets").glob("part-*/*.parquet"))
    assert [t.relative_to(root / "index" / "offsets").with_suffix(".tar") for t in tables] == [
        t.relative_to(root / "images") for t in sorted((root / "images").glob("part-*/*.tar"))
    ]
    seen = 0
    for table in tables:
        tar = root / "images" / table.parent.name / f"{table.stem}.tar"
        data = tar.read_bytes()
        rows = pq.read_table(table).to_pylist()
        for row in rows:
            assert data[row["offset"] : row["offset"] + row["size"]] == tar_samples[row["key"]][row["ext"]]
        seen += len(rows)
    assert seen == 3 * search_run["expected"]["successes"]


def test_index_metadata_is_the_embeddings_metadata(search_run: dict) -> None:
    root = Path(search_run["output_root"])
    published = sorted(p.name for p in (root / "index" / "metadata").iterdir())
    assert published == sorted(p.name for p in (root / "embeddings" / "metadata").glob("*.parquet"))
    for name in published:
        assert (root / "index" / "metadata" / name).read_bytes() == (root / "embeddings" / "metadata" / name).read_bytes()


def test_publishing_again_changes_nothing_and_missing_files_are_rebuilt(search_run: dict, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(search_run["output_root"], copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert publish_search_files(str(copy))["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before
    without_search_files(copy)
    numbers = publish_search_files(str(copy))
    assert numbers["offset_tables_written"] == len(list(copy.glob("images/part-*/*.tar")))
    assert numbers["metadata_files_written"] == len(list(copy.glob("embeddings/metadata/*.parquet")))


def test_without_offset_tables_samples_are_read_from_tar_headers(search_run: dict, tar_samples: dict, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(search_run["output_root"], copy)
    without_search_files(copy)
    reader = SampleReader(str(copy))
    for key in sorted(tar_samples)[::40]:
        assert reader.read(key, "jpg") == tar_samples[key]["jpg"]
        assert reader.read(key, "txt") == tar_samples[key]["txt"]
    with pytest.raises(KeyError, match="no shard"):
        reader.read("999999999999")


@pytest.fixture
def s3_root(search_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The finished run copied to a moto S3 server on 127.0.0.1, without its search files."""
    import socket

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    from stages import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="runs")
    monkeypatch.delenv("FSSPEC_S3", raising=False)
    storage.configure_s3(options)
    local = tmp_path / "run"
    shutil.copytree(search_run["output_root"], local)
    without_search_files(local)
    fsspec.filesystem("s3").put(str(local), "runs/run", recursive=True)
    yield "s3://runs/run"
    fsspec.config.conf.pop("s3", None)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    server.stop()


def test_a_run_on_s3_is_read_by_byte_range(s3_root: str, search_run: dict, tar_samples: dict, unique_image_keys: list) -> None:
    import fsspec

    numbers = publish_search_files(s3_root)
    assert numbers["offset_tables_written"] == len(list(Path(search_run["output_root"]).glob("images/part-*/*.tar")))
    fs = fsspec.filesystem("s3")
    assert fs.exists("runs/run/index/metadata") and fs.exists("runs/run/index/_SEARCH.json")
    reader = SampleReader(s3_root)
    keys = sorted(tar_samples)[::30]
    for key in keys:
        assert reader.read(key) == tar_samples[key]["jpg"]
        assert json.loads(reader.read(key, "json"))["key"] == key
    index = RunIndex(s3_root)
    local = RunIndex(search_run["output_root"])
    for key in unique_image_keys[:3]:
        assert index.vector_of(key).tolist() == local.vector_of(key).tolist()
        assert index.search_vector(index.vector_of(key), k=3)[0].key == key
    assert index.memory_mapped  # downloaded once, then mapped
