"""The download operators' pure parts: their settings as the DAGs render them, their paths from the layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from operators.download import DownloadImagesOperator, ListPartsOperator, RetryFailedSamplesOperator
from stages.images.download import IMAGE_SETTINGS, DownloadSettings
from stages.images.retry import TRANSIENT_REASONS, RetrySettings
from stages.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dags() -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors
    return bag.dags


def rendered(dag: Any, task_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """The task's ``settings`` as a run of ``dag`` with ``conf`` renders them (native objects)."""
    params = {**{name: param.value for name, param in dag.params.items()}, **conf}
    env = dag.get_template_env()
    task = dag.get_task(task_id)  # mapped on its own (a retry's downloads) or in the per-part group
    templates = task.partial_kwargs["settings"] if hasattr(task, "partial_kwargs") else task.settings
    return {name: env.from_string(template).render(params=params) for name, template in templates.items()}


def operator(operator_class: type, settings: dict[str, Any], output_root: str = "/runs/r1") -> Any:
    return operator_class(task_id="t", part="part-00002", output_root=output_root, settings=settings)


def test_download_settings_from_the_dag_have_the_dags_defaults(dags: dict[str, Any]) -> None:
    settings = operator(DownloadImagesOperator, rendered(dags["laion_pipeline"], "download_images", {})).stage_settings()
    assert settings == DownloadSettings()
    assert (settings.image_size, settings.number_sample_per_shard, settings.fetch_policy.max_download_seconds) == (256, 10000, 30.0)


def test_a_runs_conf_reaches_the_settings_under_the_param_names(dags: dict[str, Any]) -> None:
    conf = {"image_size": 64, "allowed_networks": ["127.0.0.0/8"], "max_download_seconds": 4, "max_retry_after_seconds": 0}
    settings = operator(DownloadImagesOperator, rendered(dags["laion_pipeline"], "download_images", conf)).stage_settings()
    assert settings.image_size == 64
    policy = settings.fetch_policy
    assert policy.allowed_networks == ("127.0.0.0/8",) and policy.networks
    assert (policy.max_download_seconds, policy.max_retry_after_seconds) == (4.0, 0.0)


def test_the_retry_asks_for_no_image_settings(dags: dict[str, Any]) -> None:
    retry_dag = dags["laion_retry_failed"]
    assert not set(IMAGE_SETTINGS) & set(retry_dag.params.keys())
    conf = {"reasons": ["http_5xx"], "timeout": 2}
    settings = operator(RetryFailedSamplesOperator, rendered(retry_dag, "retry_failed_samples", conf)).stage_settings()
    assert settings == RetrySettings(reasons=("http_5xx",), download=DownloadSettings(timeout=2))
    defaults = operator(RetryFailedSamplesOperator, rendered(retry_dag, "retry_failed_samples", {})).stage_settings()
    assert defaults.reasons == TRANSIENT_REASONS


@pytest.mark.parametrize("root", ["/runs/r1", "s3://bucket/runs/r1"])
def test_part_arguments_come_from_the_layout(root: str) -> None:
    part, images, settings = operator(DownloadImagesOperator, {"timeout": "7"}, root).part_arguments()
    assert (part, images) == (RunLayout(root).part("part-00002"), RunLayout(root).part_images("part-00002"))
    assert part.endswith("dedup/part-00002.parquet") and images.endswith("images/part-00002")
    assert settings.timeout == 7


def test_list_parts_returns_the_parts_not_yet_downloaded(tmp_path: Path) -> None:
    """Parts of earlier batches, downloaded, get no task; a retry looks at every part."""
    layout = RunLayout(str(tmp_path))
    batches = [
        {"batch": 0, "version": "v0", "parts": ["part-00000.parquet", "part-00001.parquet"]},
        {"batch": 1, "version": "v1", "parts": ["part-00002.parquet"]},
    ]
    layout.dedup_marker.mark_done({}, {"parts": [p for b in batches for p in b["parts"]], "batches": batches})
    listed = ListPartsOperator(task_id="list_dedup_parts", output_root=str(tmp_path))
    assert listed.run(context={}) == {"parts": ["part-00000", "part-00001", "part-00002"]}
    layout.download_marker("part-00000", "v0").mark_done({"dedup_version": "v0"}, {})
    layout.download_marker("part-00001", "v-other").mark_done({"dedup_version": "v-other"}, {})  # rows of another version
    assert listed.run(context={}) == {"parts": ["part-00001", "part-00002"]}
    every = ListPartsOperator(task_id="list_dedup_parts", output_root=str(tmp_path), pending_only=False)
    assert every.run(context={}) == {"parts": ["part-00000", "part-00001", "part-00002"]}
