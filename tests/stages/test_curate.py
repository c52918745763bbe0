"""The curate stage over embeddings written here in clip-retrieval's layout (random vectors;
the pipeline tests run it over real CLIP embeddings)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.curate import check_settings
from stages.curate.curated_files import curated_files_of
from stages.curate.stage import CurationSettings, curate
from stages.layout import RunLayout

DIM = 32


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_partition(layout: RunLayout, partition: str, image: np.ndarray, text: np.ndarray, keys: list[str], sha: list[str]) -> None:
    for kind, rows in (("img_emb", image), ("text_emb", text)):
        folder = Path(layout.embedding_files(kind))
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{kind}_{partition}.npy", rows.astype("float16"))
    folder = Path(layout.embedding_files("metadata"))
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"key": keys, "caption": [f"caption {k}" for k in keys], "sha256": sha, "similarity": [0.3] * len(keys)})
    pq.write_table(table, folder / f"metadata_{partition}.parquet")


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[RunLayout, dict[str, np.ndarray]]:
    """Two partitions of 40 samples. Sample 3 is sample 1 with a little noise (a near
    duplicate); samples 45 and 7 are byte-identical (same sha256), their embeddings unrelated."""
    rng = np.random.default_rng(7)
    layout = RunLayout(str(tmp_path / "out"))
    image = unit(rng.normal(size=(80, DIM)))
    image[3] = unit(image[1:2] + 0.01 * rng.normal(size=(1, DIM)))[0]
    # Captions from slightly to very unlike their images: clip_score spread over (0, 1).
    text = unit(image + rng.uniform(0.1, 3.0, size=(80, 1)) * rng.normal(size=(80, DIM)))
    keys = [f"{(i // 40) * 10000 + i % 40:012d}" for i in range(80)]
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(80)]
    sha[45] = sha[7]
    for p in range(2):
        rows = slice(p * 40, (p + 1) * 40)
        write_partition(layout, f"part-0000{p}_00000", image[rows], text[rows], keys[rows], sha[rows])
    layout.embeddings_marker.mark_done({"input_fingerprint": "x", "clip_model": "m"}, {"count": 80})
    stored = {"image": image.astype("float16").astype("float32"), "text": text.astype("float16").astype("float32")}
    return layout, {**stored, "keys": np.array(keys)}


def decisions(layout: RunLayout) -> pa.Table:
    files = sorted(Path(layout.curation, "decisions").glob("decisions_*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def curated(layout: RunLayout, kind: str) -> np.ndarray:
    return np.concatenate([np.load(f) for f in sorted(Path(layout.curated_files(kind)).glob("*.npy"))])


def test_scores_are_the_cosines_of_the_stored_embeddings_and_the_threshold_removes_exactly_those_below(dataset) -> None:
    layout, data = dataset
    expected = np.einsum("ij,ij->i", data["image"], data["text"]) / (
        np.linalg.norm(data["image"], axis=1) * np.linalg.norm(data["text"], axis=1)
    )
    threshold = float(np.median(expected))
    numbers = curate(layout, CurationSettings(min_clip_score=threshold))

    table = decisions(layout)
    assert table.column("key").to_pylist() == data["keys"].tolist()
    np.testing.assert_allclose(table.column("clip_score").to_numpy(), expected, atol=1e-5)
    below = expected < threshold
    assert table.column("reason").to_pylist() == ["below_clip_score" if b else None for b in below]
    assert numbers["below_clip_score"] == int(below.sum()) and numbers["kept"] == 80 - int(below.sum())
    assert sum(numbers["clip_score_histogram"]["counts"]) == 80
    # curated/ holds exactly the kept rows, in order, with their clip_score beside the metadata.
    np.testing.assert_array_equal(curated(layout, "img_emb"), data["image"][~below].astype("float16"))
    np.testing.assert_array_equal(curated(layout, "text_emb"), data["text"][~below].astype("float16"))
    meta = pa.concat_tables(pq.read_table(f) for f in sorted(Path(layout.curated_files("metadata")).glob("*.parquet")))
    assert meta.column("key").to_pylist() == data["keys"][~below].tolist()
    np.testing.assert_allclose(meta.column("clip_score").to_numpy(), expected[~below], atol=1e-5)


def test_without_filters_everything_is_kept(dataset) -> None:
    layout, data = dataset
    numbers = curate(layout, CurationSettings())
    assert (numbers["kept"], numbers["below_clip_score"], numbers["near_duplicates"]) == (80, 0, 0)
    assert set(decisions(layout).column("reason").to_pylist()) == {None}
    np.testing.assert_array_equal(curated(layout, "img_emb"), data["image"].astype("float16"))


def test_near_duplicates_keep_the_best_scored_sample_and_byte_identical_images_are_one_group(dataset) -> None:
    layout, data = dataset
    numbers = curate(layout, CurationSettings(near_duplicate_threshold=0.95))
    table = decisions(layout).to_pylist()
    removed = {row["key"]: row for row in table if row["reason"] == "near_duplicate"}
    keys = data["keys"]
    scores = {row["key"]: row["clip_score"] for row in table}
    # The pair (1, 3) and the byte-identical pair (7, 45): one of each removed, the other kept.
    assert numbers["near_duplicates"] == 2 and len(removed) == 2
    for a, b in ((1, 3), (7, 45)):
        loser, winner = (keys[a], keys[b]) if scores[keys[a]] < scores[keys[b]] else (keys[b], keys[a])
        assert removed[loser]["near_duplicate_of"] == winner
    assert removed[min({keys[7], keys[45]}, key=scores.get)]["near_duplicate_cosine"] == 1.0
    assert {p["key"] for p in numbers["near_duplicate_pairs"]} == set(removed)
    assert len(curated(layout, "img_emb")) == 78


def test_a_rerun_with_the_same_settings_does_nothing_and_another_threshold_rewrites_only_curation(dataset) -> None:
    layout, _ = dataset
    curate(layout, CurationSettings(min_clip_score=0.2))
    embeddings = {p: p.stat().st_mtime_ns for p in Path(layout.embeddings).rglob("*") if p.is_file()}
    first = {f: os.stat(f).st_mtime_ns for f in curated_files_of(layout)}
    assert curate(layout, CurationSettings(min_clip_score=0.2))["skipped"] is True
    assert {f: os.stat(f).st_mtime_ns for f in curated_files_of(layout)} == first

    numbers = curate(layout, CurationSettings(min_clip_score=0.6))
    assert numbers["partitions_rewritten"] == 2
    assert {p: p.stat().st_mtime_ns for p in Path(layout.embeddings).rglob("*") if p.is_file()} == embeddings
    assert not set(first) & set(curated_files_of(layout))  # a new selection is a new file name
    assert all(r is None or r == "below_clip_score" for r in decisions(layout).column("reason").to_pylist())


def test_a_partition_no_longer_embedded_leaves_curation(dataset) -> None:
    layout, _ = dataset
    curate(layout, CurationSettings())
    for kind, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        os.remove(Path(layout.embedding_files(kind), f"{kind}_part-00001_00000.{ext}"))
    numbers = curate(layout, CurationSettings())
    assert (numbers["embedded"], numbers["partitions_removed"]) == (40, 1)
    assert all("part-00001" not in f for f in curated_files_of(layout))
    assert [f.name for f in Path(layout.curation, "decisions").iterdir()] == ["decisions_part-00000_00000.parquet"]


def test_a_classifier_scores_every_image_embedding_and_its_threshold_removes(dataset, tmp_path: Path) -> None:
    import torch

    layout, data = dataset
    model = torch.nn.Linear(DIM, 1)
    path = tmp_path / "tagger.pt"
    torch.jit.save(torch.jit.script(model), path)
    with torch.no_grad():
        expected = model(torch.from_numpy(data["image"])).numpy()[:, 0]
    limit = float(np.quantile(expected, 0.75))
    numbers = curate(layout, CurationSettings(classifier=str(path), max_classifier_score=limit))
    table = decisions(layout)
    np.testing.assert_allclose(table.column("classifier_score").to_numpy(), expected, atol=1e-4)
    assert table.column("reason").to_pylist() == ["classifier" if s > limit else None for s in table.column("classifier_score").to_numpy()]
    assert numbers["classifier"] == int((table.column("classifier_score").to_numpy() > limit).sum()) == 20


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_clip_score": 1.5}, "min_clip_score = 1.5 is out of range"),
        ({"near_duplicate_threshold": 0}, "near_duplicate_threshold = 0.0 is out of range"),
        ({"near_duplicate_threshold": "high"}, "near_duplicate_threshold = 'high': expected a number"),
        ({"max_classifier_score": 0.5}, "max_classifier_score is set but classifier is not"),
        ({"classifier": "/no/such/tagger.pt"}, "classifier '/no/such/tagger.pt': no such model file"),
        ({"classifier": "json:no_such_function"}, "cannot import 'no_such_function' from 'json'"),
    ],
)
def test_bad_curation_settings_fail_before_any_work_naming_the_param(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_settings(values)


def test_a_list_that_grew_after_the_download_takes_its_samples_out(dataset, tmp_path: Path) -> None:
    """Re-LAION's case: a hash list applied to a dataset already downloaded. The URL of
    sample 2 and the image of sample 50 (sha256 as served, from the metadata) are listed."""
    layout, data = dataset
    meta = Path(layout.embedding_files("metadata"), "metadata_part-00000_00000.parquet")
    table = pq.read_table(meta)
    pq.write_table(table.append_column("url", pa.array([f"http://example.com/{i}.jpg" for i in range(40)])), meta)
    urls, images = tmp_path / "urls.txt", tmp_path / "images.txt"
    urls.write_text(hashlib.sha256(b"http://example.com/2.jpg").hexdigest() + "\n")
    images.write_text(hashlib.sha256(b"50").hexdigest().upper() + "\n")  # the fixture's sha256 of sample 50
    settings = CurationSettings.recorded({"blocklists": {"blocked_url_hashes": [str(urls)], "blocked_image_hashes": [str(images)]}})
    numbers = curate(layout, settings)
    reasons = dict(zip(decisions(layout).column("key").to_pylist(), decisions(layout).column("reason").to_pylist()))
    assert {k: r for k, r in reasons.items() if r} == {data["keys"][2]: "blocked_url", data["keys"][50]: "blocked_image"}
    assert (numbers["blocked_after_download"], numbers["kept"]) == (2, 78)
    # The same list file with one more digest: curated again, though no setting changed.
    urls.write_text(urls.read_text() + hashlib.md5(b"http://example.com/3.jpg").hexdigest() + "\n")
    assert curate(layout, settings)["blocked_after_download"] == 3
