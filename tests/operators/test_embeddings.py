"""ClipEmbeddingsOperator: the trigger form's names, settings from rendered params, the run's
shards, and a run with no downloaded image failing at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.embeddings import ClipEmbeddingsOperator
from operators.params import params_of, templates_of
from stages.embeddings import EmbeddingSettings, fingerprint
from stages.layout import RunLayout


def test_the_trigger_form_keeps_its_names_and_defaults() -> None:
    assert {name: param.value for name, param in params_of(EmbeddingSettings).items()} == {
        "clip_model": EmbeddingSettings().clip_model, "clip_batch_size": 256,
    }  # fmt: skip
    assert templates_of(EmbeddingSettings) == {"clip_model": "{{ params.clip_model }}", "clip_batch_size": "{{ params.clip_batch_size }}"}


def test_settings_come_from_the_rendered_params(tmp_path: Path) -> None:
    operator = ClipEmbeddingsOperator(
        task_id="clip_embeddings", output_root=str(tmp_path), part="part-00000", settings={"clip_model": "m", "clip_batch_size": "8"}
    )
    assert operator.stage_settings() == EmbeddingSettings(clip_model="m", clip_batch_size=8, num_prepro_workers=None)


def test_embeds_the_finished_shards_of_its_part(tmp_path: Path) -> None:
    """Embeddings already made from exactly that part's shards with that model: the task reports them."""
    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 1}, {"parts": ["part-00000.parquet"]})
    images = Path(layout.part_images("part-00000"))
    images.mkdir(parents=True)
    (images / "0000000000.tar").write_bytes(b"t" * 512)
    (images / "0000000000_stats.json").write_text('{"count": 4, "successes": 3}')
    (images / "0000000001.tar").write_bytes(b"t" * 512)  # no stats: unfinished, not embedded
    shards = [str(images / "0000000000.tar")]
    layout.part_embeddings_marker("part-00000").mark_done({"input_fingerprint": fingerprint(shards), "clip_model": "m"}, {"count": 3, "dim": 512})

    operator = ClipEmbeddingsOperator(task_id="clip_embeddings", output_root=str(tmp_path), part="part-00000", settings={"clip_model": "m"})
    numbers = operator.execute(context={})
    assert numbers["skipped"] is True and numbers["count"] == 3
    assert numbers["seconds"] == round(numbers["ended_at"] - numbers["started_at"], 3)


def test_a_part_whose_downloads_all_failed_has_no_embeddings_and_the_index_nothing(tmp_path: Path) -> None:
    """Each part records zero embeddings (one dead part does not fail a run of thousands);
    curate (the first task over every part) then fails at once, saying how many samples
    were tried and why they failed."""
    from operators.curate import CurateOperator

    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 2}, {"parts": ["part-00000.parquet", "part-00001.parquet"]})
    for index, part in enumerate(("part-00000", "part-00001")):
        images = Path(layout.part_images(part))
        images.mkdir(parents=True)
        (images / f"000000000{index}.tar").write_bytes(b"")
        stats = {"count": 3, "successes": 0, "failed_to_download": 3, "status_dict": {"refused_private_address": 2, "dns_error": 1}}
        (images / f"000000000{index}_stats.json").write_text(json.dumps(stats))

    for part in ("part-00000", "part-00001"):
        operator = ClipEmbeddingsOperator(task_id="clip_embeddings", output_root=str(tmp_path), part=part, settings={"clip_model": "m"})
        numbers = operator.execute(context={})
        assert (numbers["count"], numbers["partitions"]) == (0, 0)
    assert not list(Path(layout.embeddings).glob("img_emb/*"))
    index = CurateOperator(task_id="curate", output_root=str(tmp_path), settings={})
    with pytest.raises(AirflowFailException, match="nothing to index: 0 of 6 downloaded: refused_private_address 4, dns_error 2 "):
        index.execute(context={})
