"""Embedding plans, the stage's marker and npy headers, without clip-retrieval or a model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from stages.embedding_plans import drop_parts, extend_plan, fingerprint, plan_partitions
from stages.embeddings import EmbeddingSettings, compute_embeddings, embed_part, gather_embeddings
from stages.npy import count_embeddings, load_embeddings
from stages.layout import RunLayout


@pytest.mark.parametrize(
    "shards,workers,samples,expected",
    [(1, 4, 10, (1, 1)), (3, 2, 30_000, (1, 2)), (8, 2, 80_000, (4, 2)), (9, 4, 90_000, (2, 4)), (8, 2, 400, (1, 2))],
)
def test_every_partition_gets_a_tar_per_worker(shards: int, workers: int, samples: int, expected: tuple[int, int]) -> None:
    partitions, used = plan_partitions(shards, workers, samples, samples_per_partition=10_000)
    assert (partitions, used) == expected
    assert all(len(range(i, shards, partitions)) >= used for i in range(partitions))


def test_an_embedding_plan_grows_with_new_shards_and_keeps_its_partitions(tmp_path: Path) -> None:
    def tars(*names: str) -> list[str]:
        for name in names:
            if not (tmp_path / name).exists():
                (tmp_path / name).write_bytes(b"t" * 100)
        return [str(tmp_path / n) for n in names]

    def extend(previous: dict | None, names: tuple[str, ...], model: str = "m", samples: int = 45) -> tuple[dict, bool]:
        return extend_plan(previous, "part-00002", tars(*names), model, samples=samples, samples_per_partition=20, workers=2)

    first, kept = extend(None, ("a.tar", "b.tar", "c.tar", "d.tar"), samples=40)
    assert not kept and [len(p["tars"]) for p in first["partitions"]] == [2, 2]
    assert [p["name"] for p in first["partitions"]] == ["part-00002_00000", "part-00002_00001"]
    grown, kept = extend(first, ("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"))
    assert kept and grown["partitions"][:2] == first["partitions"]
    assert (grown["partitions"][2]["tars"], grown["partitions"][2]["name"]) == (tars("r.tar"), "part-00002_00002")
    assert extend(grown, ("a.tar", "b.tar", "c.tar", "d.tar", "r.tar")) == (grown, True)

    _, kept = extend(grown, ("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), model="other-model")
    assert not kept
    (tmp_path / "b.tar").write_bytes(b"changed")
    redone, kept = extend(grown, ("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"))
    assert not kept and sorted(t for p in redone["partitions"] for t in p["tars"]) == tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar")


def test_embeddings_of_the_same_shards_and_model_are_not_recomputed(tmp_path: Path) -> None:
    """A part's marker names its shards' fingerprint and the model: a match returns it
    without loading anything, and the folder is recorded from the parts' markers."""
    tar = tmp_path / "images" / "part-00000" / "0000000000.tar"
    tar.parent.mkdir(parents=True)
    tar.write_bytes(b"t" * 512)
    layout = RunLayout(str(tmp_path))
    numbers = {"count": 7, "text_count": 7, "dim": 4, "device": "cpu", "partitions": 1, "partitions_computed": 1,
               "compute_seconds": 2.0, "samples_per_second": 3.5}  # fmt: skip
    layout.part_embeddings_marker("part-00000").mark_done({"input_fingerprint": fingerprint([str(tar)]), "clip_model": "m"}, numbers)
    done = compute_embeddings([str(tar)], layout, EmbeddingSettings(clip_model="m"), samples=7)
    assert done["skipped"] is True and done["count"] == 7
    assert layout.embeddings_marker.read()["count"] == 7
    with pytest.raises(ValueError, match=r"no finished image shards to embed under .*images"):
        compute_embeddings([], layout, EmbeddingSettings(), samples=0)


def test_npy_headers_give_rows_and_dim_for_every_format_version(tmp_path: Path) -> None:
    vectors = np.arange(12, dtype="float32").reshape(6, 2)
    for name, rows, version in (("a.npy", vectors[:4], (1, 0)), ("b.npy", vectors[4:], (2, 0))):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, rows, version=version)
        (tmp_path / name).write_bytes(buffer.getvalue())
    assert count_embeddings(str(tmp_path)) == (6, 2)
    np.testing.assert_array_equal(load_embeddings(str(tmp_path)), vectors)  # name order is index order
    assert count_embeddings(str(tmp_path / "none")) == (0, 0)


def fake_embedded_parts(layout: RunLayout, shards: dict[str, int], model: str = "m") -> dict[str, list[str]]:
    """Shards of each part and their embeddings as a part's task leaves them: one partition
    per shard, two vectors each (no model: the files are written here)."""
    tars_by_part = {}
    folder = Path(layout.embeddings)
    for part, count in shards.items():
        tars = []
        for i in range(count):
            tar = Path(layout.part_images(part)) / f"{int(part[-5:]) * 100_000 + i:010d}.tar"
            tar.parent.mkdir(parents=True, exist_ok=True)
            tar.write_bytes(b"t" * 100)
            (tar.parent / f"{tar.stem}_stats.json").write_text("{}")
            tars.append(str(tar))
        plan, _ = extend_plan(None, part, tars, model, samples=10 * count, samples_per_partition=10, workers=1)
        for p in plan["partitions"]:
            for sub, suffix in (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet")):
                (folder / sub).mkdir(parents=True, exist_ok=True)
                if suffix == ".npy":
                    np.save(folder / sub / f"{sub}_{p['name']}.npy", np.full((2, 4), 1, dtype="float32"))
                else:
                    (folder / sub / f"{sub}_{p['name']}.parquet").write_bytes(b"m")
            (folder / "_done").mkdir(exist_ok=True)
            (folder / "_done" / p["name"]).write_text("")
        (folder / "_plans").mkdir(exist_ok=True)
        (folder / "_plans" / f"{part}.json").write_text(json.dumps(plan))
        numbers = {"count": 2 * count, "text_count": 2 * count, "dim": 4, "device": "cpu", "partitions": count,
                   "partitions_computed": count, "compute_seconds": 1.0, "samples_per_second": 2.0 * count}  # fmt: skip
        layout.part_embeddings_marker(part).mark_done({"input_fingerprint": fingerprint(tars), "clip_model": model}, numbers)
        tars_by_part[part] = tars
    return tars_by_part


def test_the_folder_is_complete_once_every_part_is_embedded_from_its_current_shards(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    tars = fake_embedded_parts(layout, {"part-00000": 3, "part-00001": 2})
    gathered = gather_embeddings(layout, tars)
    assert (gathered["count"], gathered["parts"], gathered["partitions"], gathered["clip_model"]) == (10, 2, 5, "m")
    assert layout.embeddings_marker.read()["input_fingerprint"] == fingerprint([*tars["part-00000"], *tars["part-00001"]])
    # Name order (autofaiss's) is part order, then partition order.
    assert sorted(p.name for p in (tmp_path / "embeddings" / "img_emb").iterdir())[2:4] == ["img_emb_part-00000_00002.npy", "img_emb_part-00001_00000.npy"]

    with pytest.raises(FileNotFoundError, match=r"1 of 3 parts have no embeddings .*first: part-00002"):
        gather_embeddings(layout, {**tars, "part-00002": []})
    layout.part_embeddings_marker("part-00001").clear()
    fake_embedded_parts(layout, {"part-00001": 2}, model="other")
    with pytest.raises(ValueError, match=r"embedded with 2 models \(m, other\)"):
        gather_embeddings(layout, tars)
    fake_embedded_parts(layout, {"part-00001": 2})
    Path(tars["part-00001"][0]).write_bytes(b"a retry rewrote it")
    with pytest.raises(ValueError, match=r"the embeddings of part-00001 are not of its current shards"):
        gather_embeddings(layout, tars)


def test_a_removed_part_takes_its_partitions_and_the_rest_is_kept(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    tars = fake_embedded_parts(layout, {"part-00000": 3, "part-00001": 2})
    gather_embeddings(layout, tars)
    folder = tmp_path / "embeddings"

    assert drop_parts(layout, {"part-00001"}) == {"partitions_removed": 2}
    assert sorted(p.name for p in (folder / "img_emb").iterdir()) == [f"img_emb_part-00000_{i:05d}.npy" for i in range(3)]
    assert sorted(p.name for p in (folder / "_done").iterdir()) == [f"part-00000_{i:05d}" for i in range(3)]
    assert not (folder / "_plans" / "part-00001.json").exists() and layout.part_embeddings_marker("part-00001").read() is None
    assert layout.embeddings_marker.read() is None  # build_index records the folder again
    assert gather_embeddings(layout, {"part-00000": tars["part-00000"]})["count"] == 6
    # The part that remains, embedded, is current: nothing is computed again.
    assert embed_part(layout, "part-00000", tars["part-00000"], EmbeddingSettings(clip_model="m"), samples=30)["skipped"] is True


def test_a_folder_embedded_under_one_plan_keeps_its_finished_partitions(tmp_path: Path) -> None:
    """Folders embedded before parts had their own plans (``_plan.json`` numbering every
    partition): each part takes its finished partitions over, files and all."""
    layout = RunLayout(str(tmp_path))
    tars = fake_embedded_parts(layout, {"part-00000": 2, "part-00001": 1})
    folder = tmp_path / "embeddings"
    legacy = {"clip_model": "m", "partitions": []}
    for part in tars:  # the same files, as the one plan named them
        for p in json.loads((folder / "_plans" / f"{part}.json").read_text())["partitions"]:
            i = len(legacy["partitions"])
            for sub, suffix in (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet")):
                (folder / sub / f"{sub}_{p['name']}{suffix}").rename(folder / sub / f"{sub}_{i:05d}{suffix}")
            (folder / "_done" / p["name"]).rename(folder / "_done" / str(i))
            legacy["partitions"].append({"part": part, "tars": p["tars"], "fingerprint": p["fingerprint"]})
        (folder / "_plans" / f"{part}.json").unlink()
        layout.part_embeddings_marker(part).clear()
    (folder / "_plan.json").write_text(json.dumps(legacy))

    adopted = embed_part(layout, "part-00001", tars["part-00001"], EmbeddingSettings(clip_model="m"), samples=10)
    assert (adopted["count"], adopted["partitions"], adopted["partitions_computed"]) == (2, 1, 0)
    plan = json.loads((folder / "_plans" / "part-00001.json").read_text())
    assert [p["name"] for p in plan["partitions"]] == ["00002"]
