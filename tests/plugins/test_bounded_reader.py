"""The search service's metadata lookups in bounded memory (MetadataRows in
plugins/laion_search/reader.py): rows and keys found through the parquet files' footers,
a few row groups and key columns cached, on a run of several metadata files."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from laion_search.reader import MetadataRows, RunIndex

from stages.layout import RunLayout

SIZES = [7, 1, 12, 0, 5, 9, 3, 10, 6, 4, 8, 2]  # rows per metadata file: an empty one, more files than the cache holds


def keys_of(part: int, count: int) -> list[str]:
    return [f"{part:05d}{i:04d}" for i in range(count)]


def write_metadata(folder: Path, name: str, keys: list[str], *, row_group_size: int = 4, statistics: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image_path": keys, "caption": [f"caption {k}" for k in keys], "url": [f"http://x/{k}.jpg" for k in keys]})
    pq.write_table(table, folder / name, row_group_size=row_group_size, write_statistics=statistics)


def write_run(root: Path, sizes: list[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """A finished run of ``len(sizes)`` embedding partitions: metadata files of several row
    groups (the third without statistics), their npy files, a Flat index over them."""
    import faiss

    layout = RunLayout(str(root))
    vectors = np.random.default_rng(3).normal(size=(sum(sizes), 8)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = 0
    for part, size in enumerate(sizes):
        write_metadata(Path(layout.search_metadata), f"metadata_{part:05d}.parquet", keys_of(part, size), statistics=part != 2)
        npy = Path(layout.curated_files("img_emb")) / f"img_emb_{part:05d}.npy"
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, vectors[start : start + size].astype("float16"))
        start += size
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(Path(layout.index) / "image.index"))
    layout.index_marker.mark_done({"input_fingerprint": "f"}, {"source": "curated", "image": {"index_key": "Flat", "index_param": "", "ntotal": len(vectors)}})
    frames = [pd.read_parquet(f) for f in sorted(Path(layout.search_metadata).glob("*.parquet"))]
    return pd.concat(frames, ignore_index=True), vectors


def test_rows_and_keys_are_those_of_the_concatenated_files(tmp_path: Path) -> None:
    frame, vectors = write_run(tmp_path, SIZES)
    index = RunIndex(str(tmp_path))
    rows = index.rows
    assert len(rows) == len(frame) == sum(SIZES)
    for i in range(len(frame)):  # every row, across file and row-group boundaries
        assert rows.row(i) == frame.iloc[i][["image_path", "caption", "url"]].to_dict()
    assert rows.cached()["row_groups"] <= 8
    with pytest.raises(IndexError, match=f"outside the {len(frame)} metadata rows"):
        rows.row(len(frame))

    for part, size in enumerate(SIZES):
        for key in keys_of(part, size)[:1] + keys_of(part, size)[-1:]:  # each file's first and last key
            i = frame.index[frame["image_path"] == key][0]
            assert rows.position(key) == i
            assert index.vector_of(key).tolist() == vectors[i].astype("float16").tolist()
            assert index.search_vector(index.vector_of(key), k=3)[0].key == key
    assert rows.position("000020005") == frame.index[frame["image_path"] == "000020005"][0]  # the file without statistics
    for unknown in ("", "000000007", "999", "000000003x", "000110000x"):  # "...3x", "...2x": in a range, not a key
        assert rows.position(unknown) is None
    with pytest.raises(KeyError, match=re.escape(f"run {tmp_path} has no sample '999'")):
        index.vector_of("999")


def test_after_every_key_only_a_few_files_are_held(tmp_path: Path) -> None:
    frame, _ = write_run(tmp_path, SIZES)
    rows = MetadataRows(sorted(str(f) for f in Path(RunLayout(str(tmp_path)).search_metadata).glob("*.parquet")), cached=3, open_files=2)
    assert rows.cached() == {"row_groups": 0, "key_columns": 0, "open_files": 0}  # footers only, until a lookup
    assert [rows.position(key) for key in frame["image_path"]] == list(range(len(frame)))
    assert [rows.row(i)["image_path"] for i in range(len(frame))] == frame["image_path"].tolist()
    assert rows.cached() == {"row_groups": 3, "key_columns": 3, "open_files": 2}
    rows.close()
    assert rows.cached()["open_files"] == 0
    assert rows.row(0)["image_path"] == frame["image_path"][0] and rows.cached()["open_files"] == 1  # opened again
    # What stays for every file: its row count, its row groups' first rows, its key range.
    assert rows.starts == [0, *np.cumsum(SIZES).tolist()]
    assert rows.groups[2].tolist() == [0, 4, 8] and rows.groups[3].tolist() == [0]  # an empty file: one empty row group
    assert rows.key_ranges[2] == ("000020000", "000020011") and rows.key_ranges[3] is None


def test_files_whose_key_ranges_overlap_are_all_searched(tmp_path: Path) -> None:
    write_metadata(tmp_path, "a.parquet", ["k1", "k3", "k5"], row_group_size=2)
    write_metadata(tmp_path, "b.parquet", ["k2", "k4"])
    write_metadata(tmp_path, "c.parquet", ["k3"])  # a key written twice: its first row is kept
    rows = MetadataRows([str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.parquet")])
    assert [rows.position(k) for k in ("k1", "k2", "k3", "k4", "k5", "k0", "k6")] == [0, 3, 1, 4, 2, None, None]
    assert rows.row(5) == {"image_path": "k3", "caption": "caption k3", "url": "http://x/k3.jpg"}


def test_missing_columns_and_remote_files(tmp_path: Path) -> None:
    import fsspec

    root = f"memory://bounded-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        for n, keys in enumerate((["a0", "a1"], ["b0"])):
            with fs.open(f"{root}/metadata_{n}.parquet", "wb") as f:
                pq.write_table(pa.table({"image_path": keys}), f)  # no caption, no url
        rows = MetadataRows([f"{root}/metadata_0.parquet", f"{root}/metadata_1.parquet"])
        assert rows.position("b0") == 2
        assert rows.row(2) == {"image_path": "b0", "caption": "", "url": ""}
        with fs.open(f"{root}/bad.parquet", "wb") as f:
            pq.write_table(pa.table({"key": ["a"]}), f)
        with pytest.raises(ValueError, match="has no image_path column \\(columns: key\\)"):
            MetadataRows([f"{root}/bad.parquet"])
    finally:
        fs.rm(root, recursive=True)


def test_a_run_without_metadata_files_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no metadata .parquet"):
        RunIndex(str(tmp_path)).rows  # noqa: B018
