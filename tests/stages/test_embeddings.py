"""Embedding plans, the stage's marker and npy headers, without clip-retrieval or a model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from stages.embeddings import EmbeddingSettings, compute_embeddings, count_embeddings, extend_plan, fingerprint, load_embeddings, plan_partitions
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

    first, kept = extend_plan(None, tars("a.tar", "b.tar", "c.tar", "d.tar"), "m", samples=40, samples_per_partition=20, workers=2)
    assert not kept and [len(p["tars"]) for p in first["partitions"]] == [2, 2]
    grown, kept = extend_plan(first, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "m", samples=45, samples_per_partition=20, workers=2)
    assert kept and grown["partitions"][:2] == first["partitions"]
    assert grown["partitions"][2]["tars"] == tars("r.tar")
    assert extend_plan(grown, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "m", samples=45, samples_per_partition=20, workers=2) == (grown, True)

    _, kept = extend_plan(grown, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "other-model", samples=45, samples_per_partition=20, workers=2)
    assert not kept
    (tmp_path / "b.tar").write_bytes(b"changed")
    redone, kept = extend_plan(grown, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "m", samples=45, samples_per_partition=20, workers=2)
    assert not kept and sorted(t for p in redone["partitions"] for t in p["tars"]) == tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar")


def test_embeddings_of_the_same_shards_and_model_are_not_recomputed(tmp_path: Path) -> None:
    """The marker names the shards' fingerprint and the model: a match returns it without loading anything."""
    tar = tmp_path / "images" / "part-00000" / "0000000000.tar"
    tar.parent.mkdir(parents=True)
    tar.write_bytes(b"t" * 512)
    layout = RunLayout(str(tmp_path))
    layout.embeddings_marker.mark_done({"input_fingerprint": fingerprint([str(tar)]), "clip_model": "m"}, {"count": 7})
    done = compute_embeddings([str(tar)], layout, EmbeddingSettings(clip_model="m"), samples=7)
    assert done["skipped"] is True and done["count"] == 7
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


def test_partitions_hold_one_part_each_and_a_removed_part_takes_its_partitions(tmp_path: Path) -> None:
    """A batch's parts can be taken out: its partitions' files go, their numbers stay
    (holding nothing), and the marker counts what remains."""
    import json

    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({}, {"parts": ["part-00000.parquet"], "batches": [{"batch": 0, "version": "v", "parts": ["part-00000.parquet"]}]})
    tars = []
    for part, shards in (("part-00000", 3), ("part-00001", 2)):
        for i in range(shards):
            tar = Path(layout.part_images(part)) / f"{int(part[-5:]) * 100_000 + i:010d}.tar"
            tar.parent.mkdir(parents=True, exist_ok=True)
            tar.write_bytes(b"t" * 100)
            (tar.parent / f"{tar.stem}_stats.json").write_text("{}")
            tars.append(str(tar))
    plan, _ = extend_plan(None, tars, "m", samples=50, samples_per_partition=10, workers=1)
    assert [(p["part"], len(p["tars"])) for p in plan["partitions"]] == [("part-00000", 1)] * 3 + [("part-00001", 1)] * 2
    folder = Path(layout.embeddings)
    for i in range(len(plan["partitions"])):
        for sub, suffix in (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet")):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            if suffix == ".npy":
                np.save(folder / sub / f"{sub}_{i:05d}.npy", np.full((2, 4), i, dtype="float32"))
            else:
                (folder / sub / f"{sub}_{i:05d}.parquet").write_bytes(b"m")
        (folder / "_done").mkdir(exist_ok=True)
        (folder / "_done" / str(i)).write_text("")
    (folder / "_plan.json").write_text(json.dumps(plan))
    layout.embeddings_marker.mark_done({"input_fingerprint": fingerprint(tars), "clip_model": "m"}, {"count": 10, "clip_model": "m"})

    from stages.embeddings import drop_parts

    assert drop_parts(layout, {"part-00001"}) == {"partitions_removed": 2, "count": 6}
    assert sorted(p.name for p in (folder / "img_emb").iterdir()) == [f"img_emb_{i:05d}.npy" for i in range(3)]
    assert sorted(p.name for p in (folder / "_done").iterdir()) == ["0", "1", "2"]
    kept = json.loads((folder / "_plan.json").read_text())
    assert [len(p["tars"]) for p in kept["partitions"]] == [1, 1, 1, 0, 0] and kept["partitions"][3]["removed"]
    marker = layout.embeddings_marker.read()
    assert (marker["count"], marker["input_fingerprint"]) == (6, fingerprint(tars[:3]))
    # The shards that remain, embedded, are current: nothing is computed again.
    assert compute_embeddings(tars[:3], layout, EmbeddingSettings(clip_model="m"), samples=6)["skipped"] is True
