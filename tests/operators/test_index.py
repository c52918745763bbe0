"""BuildIndexOperator: settings from rendered params; a pair of indexes and the search files,
once; no embeddings fails at once."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
    pq.write_table(pa.table({"image_path": [f"{i:012d}" for i in range(300)]}), Path(layout.embeddings, "metadata", "metadata_00000.parquet"))
    mark_embedded(layout, 300)

    settings = {"max_index_memory_usage": "4G", "current_memory_available": "8G", "index_key": None}
    operator = BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings=settings)
    numbers = operator.execute(context={})
    assert layout.has_index() and numbers["image"]["ntotal"] == numbers["text"]["ntotal"] == 300
    assert numbers["image_recall_at_10"] == numbers["image"]["recall_at_10"] > 0.9
    assert numbers["search"]["metadata_files_written"] == 1 and Path(layout.index, "metadata", "metadata_00000.parquet").exists()
    again = operator.execute(context={})
    assert again["skipped"] is True and again["search"]["skipped"] is True


def test_a_part_not_embedded_is_named(tmp_path: Path) -> None:
    """build_index records every part's embeddings as one folder first: a part whose
    clip_embeddings task has not finished is named, and nothing is built."""
    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 2}, {"parts": ["part-00000.parquet", "part-00001.parquet"]})
    layout.part_embeddings_marker("part-00000").mark_done({"input_fingerprint": fingerprint([]), "clip_model": "m"}, {"count": 0})
    operator = BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings={})
    with pytest.raises(FileNotFoundError, match=r"1 of 2 parts have no embeddings under .*embeddings \(first: part-00001\)"):
        operator.execute(context={})
    assert not layout.has_index()
