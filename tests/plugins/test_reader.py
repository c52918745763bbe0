"""Reading a finished run (plugins/laion_search/reader.py): samples by byte range, embedding
rows from .npy files, the index and its rows; on small runs built here, then on the
plugin's finished run, locally and on S3."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from laion_search.reader import EmbeddingRows, RunIndex, SampleReader

from stages.index.search_files import publish_search_files, write_offsets
from stages.layout import RunLayout

# --- builders: a run's files as the stages write them -----------------------------------


def write_dedup_stats(root: Path, parts: list[str]) -> None:
    (root / "dedup").mkdir(parents=True, exist_ok=True)
    (root / "dedup" / "_stats.json").write_text(json.dumps({"parts": [f"{p}.parquet" for p in parts]}))


def write_shard(root: Path, part: str, shard: str, samples: dict[str, dict[str, bytes]], *, finished: bool = True) -> str:
    """A webdataset tar as img2dataset writes it; its ``_stats.json`` when ``finished``."""
    folder = root / "images" / part
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{shard}.tar", "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if finished:
        (folder / f"{shard}_stats.json").write_text(json.dumps({"successes": len(samples)}))
    return str(folder / f"{shard}.tar")


def samples_of(shard: str, count: int, size: int = 1) -> dict[str, dict[str, bytes]]:
    """``count`` samples keyed as img2dataset keys them: the shard name, then the index in the shard."""
    return {
        f"{shard}{i:04d}": {"jpg": bytes([i]) * (100 * size + i), "txt": f"caption {shard}/{i}".encode(), "json": b"{}"}
        for i in range(count)
    }


@pytest.fixture
def small_run(tmp_path: Path) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """Two parts of one and two shards, offset tables published for every shard."""
    root = tmp_path / "run"
    write_dedup_stats(root, ["part-00000", "part-00001"])
    truth: dict[str, dict[str, bytes]] = {}
    for part, shard in (("part-00000", "00000"), ("part-00000", "00001"), ("part-00001", "00002")):
        samples = samples_of(shard, 5)
        tar = write_shard(root, part, shard, samples)
        write_offsets(tar, RunLayout(str(root)).offsets_table(part, shard))
        truth.update(samples)
    return root, truth


# --- samples ----------------------------------------------------------------------------


def test_every_file_of_every_sample_is_read_through_its_offset_table(small_run: tuple, caplog: pytest.LogCaptureFixture) -> None:
    root, truth = small_run
    reader = SampleReader(str(root))
    with caplog.at_level(logging.INFO, logger="laion_search.reader"):
        for key, files in truth.items():
            for ext, data in files.items():
                assert reader.read(key, ext) == data
    assert "No current offset table" not in caplog.text


def test_a_stale_or_missing_offset_table_falls_back_to_the_tar_headers(small_run: tuple, caplog: pytest.LogCaptureFixture) -> None:
    root, _ = small_run
    table = RunLayout(str(root)).offsets_table("part-00000", "00000")
    tar = write_shard(root, "part-00000", "00000", samples_of("00000", 5))
    before = Path(tar).stat().st_size
    rewritten = samples_of("00000", 3, size=100)  # the shard downloaded again: its table no longer fits
    write_shard(root, "part-00000", "00000", rewritten)
    assert Path(tar).stat().st_size != before and Path(table).exists()
    Path(RunLayout(str(root)).offsets_table("part-00001", "00002")).unlink()
    reader = SampleReader(str(root))
    with caplog.at_level(logging.INFO, logger="laion_search.reader"):
        assert reader.read("000000002") == rewritten["000000002"]["jpg"]
        assert reader.read("000020004", "txt") == b"caption 00002/4"
    assert caplog.text.count("No current offset table") == 2


def test_only_finished_shards_of_the_current_parts_are_read(small_run: tuple) -> None:
    root, _ = small_run
    write_shard(root, "part-00001", "00003", samples_of("00003", 2), finished=False)  # still downloading
    write_shard(root, "part-00002", "00004", samples_of("00004", 2))  # a part of an older dedup
    reader = SampleReader(str(root))
    assert sorted(reader.shards) == ["00000", "00001", "00002"]
    for key in ("000030000", "000040000", "999999999"):
        with pytest.raises(KeyError, match=re.escape(f"no shard of {root} holds sample '{key}'")):
            reader.read(key)


def test_a_file_the_sample_lacks_is_a_key_error_that_names_it(small_run: tuple) -> None:
    root, _ = small_run
    with pytest.raises(KeyError, match=r"sample '000010003' has no \.png in .*00001\.tar"):
        SampleReader(str(root)).read("000010003", "png")


# --- embedding rows ---------------------------------------------------------------------


def write_npy(path: Path, array: np.ndarray, version: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)


@pytest.fixture
def numpy_private_header_reader_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's private ``_read_array_header`` as numpy 2.5 left it: callable from numpy only."""
    private = getattr(np.lib.format, "_read_array_header", None)

    def only_from_numpy(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if private is None or not caller.startswith("numpy."):
            raise AttributeError(f"{caller} called numpy.lib.format._read_array_header, which is private to numpy")
        return private(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "_read_array_header", only_from_numpy, raising=False)


@pytest.mark.usefixtures("numpy_private_header_reader_gone")
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_embedding_rows_are_read_with_numpys_public_header_api(tmp_path: Path, version: tuple) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(rows, 8)).astype("float16") for rows in (3, 1, 4)]  # clip-retrieval writes float16
    for i, array in enumerate(arrays):
        write_npy(tmp_path / "img_emb" / f"img_emb_{i}.npy", array, version)
    with open(tmp_path / "img_emb" / "img_emb_0.npy", "rb") as f:
        assert np.lib.format.read_magic(f) == version
    expected = np.concatenate(arrays)
    rows = EmbeddingRows(str(tmp_path / "img_emb"))
    assert [(npy.rows, npy.dim, str(npy.dtype)) for npy in rows.files] == [(3, 8, "float16"), (1, 8, "float16"), (4, 8, "float16")]
    for i in range(len(expected)):
        row = rows.row(i)
        assert row.dtype == np.float16 and row.tolist() == expected[i].tolist()
    with pytest.raises(IndexError, match=re.escape(f"no embedding row 8 under {tmp_path / 'img_emb'} (8 rows)")):
        rows.row(8)


def test_an_npy_whose_rows_are_not_contiguous_is_refused_by_name(tmp_path: Path) -> None:
    write_npy(tmp_path / "img_emb" / "img_emb_0.npy", np.asfortranarray(np.ones((3, 4), dtype="float32")), (1, 0))
    with pytest.raises(ValueError, match=r"img_emb_0\.npy holds a Fortran-ordered array of shape \(3, 4\)"):
        EmbeddingRows(str(tmp_path / "img_emb")).files  # noqa: B018


# --- the index and its rows -----------------------------------------------------------------


def write_indexed_run(root: Path, vectors: np.ndarray, *, metadata_in: str = "index") -> list[str]:
    """The files RunIndex reads: the image index, build_index's marker, metadata rows, embeddings."""
    import faiss
    import pandas as pd

    keys = [f"00000{i:04d}" for i in range(len(vectors))]
    layout = RunLayout(str(root))
    write_npy(Path(layout.embeddings) / "img_emb" / "img_emb_0.npy", vectors.astype("float16"), (1, 0))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors.astype("float32"))
    Path(layout.index).mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(Path(layout.index) / "image.index"))
    layout.index_marker.mark_done({"input_fingerprint": "f"}, {"image": {"index_key": "Flat", "index_param": "", "ntotal": len(vectors)}})
    rows = pd.DataFrame({"image_path": keys, "caption": [f"caption {k}" for k in keys], "url": [f"http://x/{k}.jpg" for k in keys]})
    (root / metadata_in / "metadata").mkdir(parents=True, exist_ok=True)
    rows.to_parquet(root / metadata_in / "metadata" / "0.parquet")
    return keys


@pytest.mark.parametrize("metadata_in", ["index", "embeddings"])  # embeddings/: runs published before index/metadata
def test_a_sample_key_finds_itself_first(tmp_path: Path, metadata_in: str) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(20, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = write_indexed_run(tmp_path, vectors, metadata_in=metadata_in)
    index = RunIndex(str(tmp_path))
    for i, key in enumerate(keys):
        assert index.vector_of(key).tolist() == vectors[i].astype("float16").tolist()
        first = index.search_vector(index.vector_of(key), k=3)[0]
        assert (first.key, first.caption, first.url) == (key, f"caption {key}", f"http://x/{key}.jpg")
        assert first.score == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(KeyError, match=re.escape(f"run {tmp_path} has no sample '999'")):
        index.vector_of("999")


# --- the plugin's finished run ----------------------------------------------------------


@pytest.mark.heavy
def test_without_offset_tables_samples_are_read_from_tar_headers(
    search_run: dict, tar_samples: dict, tmp_path: Path, without_search_files: Callable[[Path], None]
) -> None:
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
def s3_root(search_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, without_search_files: Callable[[Path], None]) -> Any:
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


@pytest.mark.heavy
def test_a_run_on_s3_is_read_by_byte_range(s3_root: str, search_run: dict, tar_samples: dict, unique_image_keys: list) -> None:
    import fsspec

    numbers = publish_search_files(RunLayout(s3_root))
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
