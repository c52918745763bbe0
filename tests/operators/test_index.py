"""BuildIndexOperator: settings from rendered params; a pair of indexes and the search files,
once; no embeddings fails at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.index import BuildIndexOperator
from operators.params import params_of
from stages.index.build import IndexSettings
from stages.layout import RunLayout


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
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 1}, {"parts": []})
    rng = np.random.default_rng(0)
    for sub in ("img_emb", "text_emb"):
        vectors = rng.normal(size=(300, 16)).astype("float32")
        Path(layout.embeddings, sub).mkdir(parents=True)
        np.save(Path(layout.embeddings, sub, f"{sub}_00000.npy"), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    Path(layout.embeddings, "metadata").mkdir()
    pq.write_table(pa.table({"image_path": [f"{i:012d}" for i in range(300)]}), Path(layout.embeddings, "metadata", "metadata_00000.parquet"))
    layout.embeddings_marker.mark_done({"input_fingerprint": "e", "clip_model": "m"}, {"count": 300})

    settings = {"max_index_memory_usage": "4G", "current_memory_available": "8G", "index_key": None}
    operator = BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings=settings)
    numbers = operator.execute(context={})
    assert layout.has_index() and numbers["image"]["ntotal"] == numbers["text"]["ntotal"] == 300
    assert numbers["image_recall_at_10"] == numbers["image"]["recall_at_10"] > 0.9
    assert numbers["search"]["metadata_files_written"] == 1 and Path(layout.index, "metadata", "metadata_00000.parquet").exists()
    again = operator.execute(context={})
    assert again["skipped"] is True and again["search"]["skipped"] is True


def test_no_embeddings_is_nothing_to_index(tmp_path: Path) -> None:
    """Fails at once (no retries): indexing the same empty folder again fails the same way."""
    layout = RunLayout(str(tmp_path))
    Path(layout.embedding_files("img_emb")).mkdir(parents=True)
    operator = BuildIndexOperator(task_id="build_index", output_root=str(tmp_path), settings={})
    with pytest.raises(AirflowFailException, match=r"no embeddings under .*img_emb: nothing to index"):
        operator.execute(context={})
    assert not layout.has_index()
