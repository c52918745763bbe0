"""BuildIndexOperator (after CurateOperator): settings from rendered params; a pair of indexes
and the search files, once; a part not embedded, or nothing kept, fails at once."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.curate import CurateOperator
from operators.index import BuildIndexOperator
from operators.params import params_of
from stages.index.build import IndexSettings
from stages.layout import RunLayout
from stages.embeddings import fingerprint
from shard_files import mark_embedded


def test_the_trigger_form_keeps_its_names_and_defaults() -> None:
    params = params_of(IndexSettings)
    assert {name: param.value for name, param in params.items()} == {
        "max_index_memory_usage": "4G", "current_memory_available": "8G", "index_key": None,
    }  # fmt: skip
    assert params["max_index_memory_usage"].schema["pattern"] == r"^[0-9]+(\.[0-9]+)?[KMG]B?$"


def test_an_empty_index_key_lets_autofaiss_choose(tmp_path: Path) -> None:
    for rendered in (None, "", "None"):
        operator = BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings={"index_key": rendered})
        assert operator.stage_settings() == IndexSettings()


def test_builds_the_indexes_and_the_search_files_once(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 1}, {"parts": ["part-00000.parquet"]})
    shards = Path(layout.part_images("part-00000"))
    shards.mkdir(parents=True)
    tarfile.open(shards / "0000000000.tar", "w").close()  # its members are not read here
    (shards / "0000000000_stats.json").write_text('{"count": 300, "successes": 300}')
    rng = np.random.default_rng(0)
    for sub in ("img_emb", "text_emb"):
        vectors = rng.normal(size=(300, 16)).astype("float32")
        Path(layout.embeddings, sub).mkdir(parents=True)
        np.save(Path(layout.embeddings, sub, f"{sub}_00000.npy"), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    Path(layout.embeddings, "metadata").mkdir()
    keys = [f"{i:012d}" for i in range(300)]
    pq.write_table(pa.table({"image_path": keys, "key": keys}), Path(layout.embeddings, "metadata", "metadata_part-00000_00000.parquet"))
    for sub in ("img_emb", "text_emb"):
        Path(layout.embeddings, sub, f"{sub}_00000.npy").rename(Path(layout.embeddings, sub, f"{sub}_part-00000_00000.npy"))
    mark_embedded(layout, 300)
    with pytest.raises(FileNotFoundError, match="curate has not finished"):
        BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings={}).execute(context={})
    assert CurateOperator(task_id="curate", output_root=str(tmp_path), settings={}).execute(context={})["kept"] == 300

    settings = {"max_index_memory_usage": "4G", "current_memory_available": "8G", "index_key": None}
    operator = BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings=settings)
    numbers = operator.execute(context={})
    assert layout.has_index() and numbers["image"]["ntotal"] == numbers["text"]["ntotal"] == 300
    assert numbers["image_recall_at_10"] == numbers["image"]["recall_at_10"] > 0.9
    [published] = Path(layout.index, "metadata").glob("*.parquet")
    assert numbers["search"]["metadata_files_written"] == 1 and pq.read_table(published).column("key").to_pylist() == keys
    again = operator.execute(context={})
    assert again["skipped"] is True and again["search"]["skipped"] is True


def test_a_part_not_embedded_is_named(tmp_path: Path) -> None:
    """curate records every part's embeddings as one folder first: a part whose
    clip_embeddings task has not finished is named, and nothing is curated or built."""
    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 2}, {"parts": ["part-00000.parquet", "part-00001.parquet"]})
    layout.part_embeddings_marker("part-00000").mark_done({"input_fingerprint": fingerprint([]), "clip_model": "m"}, {"count": 0})
    operator = CurateOperator(task_id="curate", output_root=str(tmp_path), settings={})
    with pytest.raises(FileNotFoundError, match=r"1 of 2 parts have no embeddings under .*embeddings \(first: part-00001\)"):
        operator.execute(context={})
    assert not layout.curation_marker.read() and not layout.has_index()
