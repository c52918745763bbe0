"""What build_index publishes for search: offset tables per current shard and index/metadata."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.index.search_files import publish_search_files, tar_members
from stages.layout import RunLayout


def write_shard(layout: RunLayout, part: str, shard: str, samples: dict[str, bytes]) -> Path:
    """A finished webdataset shard: ``<key>.jpg`` and ``<key>.txt`` per sample, then its stats."""
    tar = Path(layout.part_images(part), f"{shard}.tar")
    tar.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar, "w") as archive:
        for key, image in samples.items():
            for ext, data in (("jpg", image), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    Path(layout.part_images(part), f"{shard}_stats.json").write_text(json.dumps({"count": len(samples)}))
    return tar


def embed(layout: RunLayout, fingerprint: str, keys: list[str]) -> None:
    """The curate stage's marker and its kept samples' metadata file."""
    metadata = Path(layout.curated_files("metadata"))
    metadata.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_path": keys}), metadata / "metadata_00000.parquet")
    layout.curation_marker.mark_done({"input_fingerprint": fingerprint, "settings": {}}, {"kept": len(keys)})


IMAGES = {"000000000000": b"a" * 700, "000000000001": b"b" * 30, "000010000000": b"c" * 1500}


@pytest.fixture
def run(tmp_path: Path) -> RunLayout:
    layout = RunLayout(str(tmp_path / "run"))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 2}, {"parts": ["part-00000.parquet", "part-00001.parquet"]})
    write_shard(layout, "part-00000", "0000000000", {k: IMAGES[k] for k in ("000000000000", "000000000001")})
    write_shard(layout, "part-00001", "0000100000", {"000010000000": IMAGES["000010000000"]})
    embed(layout, "e1", list(IMAGES))
    return layout


def offsets(layout: RunLayout) -> dict[str, list[dict]]:
    return {table: pq.read_table(table).to_pylist() for table in layout.offsets_tables()}


def test_every_offset_points_at_its_member(run: RunLayout) -> None:
    numbers = publish_search_files(run)
    assert numbers == {"offset_tables_written": 2, "metadata_files_written": 1, "skipped": False}
    tables = offsets(run)
    assert list(tables) == [run.offsets_table("part-00000", "0000000000"), run.offsets_table("part-00001", "0000100000")]
    members = {}
    for table, rows in tables.items():
        data = Path(run.part_images(Path(table).parent.name), f"{Path(table).stem}.tar").read_bytes()
        members.update({(r["key"], r["ext"]): data[r["offset"] : r["offset"] + r["size"]] for r in rows})
    assert members == {
        **{(key, "jpg"): image for key, image in IMAGES.items()},
        **{(key, "txt"): f"caption {key}".encode() for key in IMAGES},
    }
    published = Path(run.index, "metadata", "metadata_00000.parquet").read_bytes()
    assert published == Path(run.curated_files("metadata"), "metadata_00000.parquet").read_bytes()
    assert run.search_marker.read()["curation_fingerprint"] == "e1"


def test_publishing_again_rewrites_nothing(run: RunLayout) -> None:
    publish_search_files(run)
    files = {p: p.stat().st_mtime_ns for p in Path(run.index).rglob("*") if p.is_file()}
    assert publish_search_files(run)["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in Path(run.index).rglob("*") if p.is_file()} == files


def test_a_new_shard_gets_its_table_and_the_others_are_kept(run: RunLayout) -> None:
    """As after a retry of failed samples: one more shard, new embeddings."""
    publish_search_files(run)
    kept = {table: Path(table).stat().st_mtime_ns for table in run.offsets_tables()}
    write_shard(run, "part-00001", "0000150000", {"000015000000": b"d" * 10})
    embed(run, "e2", [*IMAGES, "000015000000"])
    assert publish_search_files(run) == {"offset_tables_written": 1, "metadata_files_written": 1, "skipped": False}
    assert {table: Path(table).stat().st_mtime_ns for table in kept} == kept
    assert len(offsets(run)[run.offsets_table("part-00001", "0000150000")]) == 2


def test_the_table_of_a_shard_no_longer_current_is_removed(run: RunLayout) -> None:
    publish_search_files(run)
    run.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 2}, {"parts": ["part-00000.parquet"]})
    publish_search_files(run)
    assert list(offsets(run)) == [run.offsets_table("part-00000", "0000000000")]


def test_search_files_need_a_finished_curation(run: RunLayout) -> None:
    run.curation_marker.clear()
    with pytest.raises(FileNotFoundError, match=r"curation/_SUCCESS.json does not exist: curate has not finished"):
        publish_search_files(run)


def test_tar_members_are_the_files_of_a_tar(tmp_path: Path) -> None:
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as archive:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        info = tarfile.TarInfo("sub/0001.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    [(key, ext, offset, size)] = tar_members(str(tar))
    assert (key, ext, size) == ("0001", "json", 2) and tar.read_bytes()[offset : offset + size] == b"{}"


def write_metadata(layout: RunLayout, partition: int, keys: list[str]) -> Path:
    path = Path(layout.curated_files("metadata"), f"metadata_{partition:05d}.parquet")
    pq.write_table(pa.table({"image_path": keys}), path)
    return path


def test_only_new_or_changed_metadata_is_copied_and_removed_batches_go(run: RunLayout) -> None:
    """As when batches come and go: one added, one removed, the others copied once."""
    write_metadata(run, 1, ["000000000001"])
    write_metadata(run, 2, ["000010000000"])
    publish_search_files(run)
    published = Path(run.search_metadata)
    first = {p.name: p.stat().st_mtime_ns for p in published.iterdir()}
    assert sorted(first) == ["metadata_00000.parquet", "metadata_00001.parquet", "metadata_00002.parquet"]

    Path(run.curated_files("metadata"), "metadata_00001.parquet").unlink()  # a batch removed
    write_metadata(run, 3, ["000015000000", "000015000001"])  # a batch added
    run.curation_marker.mark_done({"input_fingerprint": "e2", "settings": {}}, {"kept": 4})
    assert publish_search_files(run)["metadata_files_written"] == 1
    # index/metadata holds exactly the curated metadata files; the unchanged ones were left alone.
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in Path(run.curated_files("metadata")).iterdir())
    assert {name: (published / name).stat().st_mtime_ns for name in ("metadata_00000.parquet", "metadata_00002.parquet")} == {
        name: first[name] for name in ("metadata_00000.parquet", "metadata_00002.parquet")
    }
    for source in Path(run.curated_files("metadata")).iterdir():
        assert (published / source.name).read_bytes() == source.read_bytes()


def test_the_search_marker_names_the_index_it_was_written_for(run: RunLayout) -> None:
    """A search service takes a new index as published once this marker names it."""
    run.index_marker.mark_done({"input_fingerprint": "i1"}, {})
    publish_search_files(run)
    assert run.search_marker.read()["index_fingerprint"] == "i1"
    run.index_marker.mark_done({"input_fingerprint": "i2"}, {})  # the index grew, the search files' inputs did not change
    assert publish_search_files(run) == {"offset_tables_written": 0, "metadata_files_written": 0, "skipped": False}
    assert run.search_marker.read()["index_fingerprint"] == "i2"
    assert publish_search_files(run)["skipped"] is True
