"""The index folder keeps clip-retrieval's layout: its own back end loads it and answers queries."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def knn(search_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from clip_retrieval.clip_back import ClipOptions, KnnService, load_clip_indices

    paths = tmp_path_factory.mktemp("clip-back") / "indices_paths.json"
    paths.write_text(json.dumps({"run": str(Path(search_run["output_root"]) / "index")}))
    options = ClipOptions(
        indice_folder="",
        clip_model=search_run["clip_model"],
        enable_hdf5=False,
        enable_faiss_memory_mapping=True,
        columns_to_return=["url", "image_path", "caption"],
        reorder_metadata_by_ivf_index=False,
        enable_mclip_option=False,
        use_jit=False,
        use_arrow=False,
        provide_safety_model=False,
        provide_violence_detector=False,
        provide_aesthetic_embeddings=False,
    )
    return KnnService(clip_resources=load_clip_indices(str(paths), options))


def test_clip_back_finds_an_image_by_itself(knn: Any, tar_samples: dict, unique_image_keys: list) -> None:
    for key in unique_image_keys[::60]:
        query = base64.b64encode(tar_samples[key]["jpg"]).decode()
        results = knn.query(image_input=query, modality="image", num_images=5, num_result_ids=5, deduplicate=False)
        assert results[0]["image_path"] == key
        assert results[0]["caption"] == json.loads(tar_samples[key]["json"])["caption"]


def test_clip_back_answers_text_queries_on_both_indexes(knn: Any, search_run: dict) -> None:
    for modality in ("image", "text"):
        results = knn.query(text_input="a photo of a cat", modality=modality, num_images=10, num_result_ids=10, deduplicate=False)
        assert len(results) == 10
        assert all({"url", "image_path", "caption", "similarity"} <= set(r) for r in results)
