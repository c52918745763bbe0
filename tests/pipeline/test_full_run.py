"""One full run of the DAG on the sample web: the report agrees with what the web holds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from shard_files import samples

# The first test also pays for the module's run (about a minute idle, several on a loaded
# machine); the rerun test for a second one.
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def finished(airflow_db: str, sample_web: Any, clip_model: str, run: Any, conf_for: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(output root, the sample web's truth, the run's id)."""
    web, expected, _ = sample_web
    output = tmp_path_factory.mktemp("run") / "output"
    return output, expected, run(conf_for(web, output, clip_model)).run_id


def report_of(output: Path) -> dict:
    return json.loads((output / "report" / "report.json").read_text())


def run_seconds(run_id: str) -> float:
    """The run's span as Airflow recorded it."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        start, end = session.execute(select(DagRun.start_date, DagRun.end_date).where(DagRun.run_id == run_id)).one()
    return (end - start).total_seconds()


def returned_values(run_id: str) -> dict[str, Any]:
    """task id -> what the (unmapped) task returned in run ``run_id``, as its XCom holds it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(XComModel).where(XComModel.run_id == run_id, XComModel.key == "return_value", XComModel.map_index == -1)
    with create_session() as session:
        return {x.task_id: XComModel.deserialize_value(x) for x in session.scalars(query)}


def test_dedup_counts_match_the_sample_web(finished: Any) -> None:
    output, expected, _ = finished
    dedup = report_of(output)["dedup"]
    assert dedup["rows_in"] == expected["rows_in"]
    assert dedup["rows_invalid"] == expected["rows_invalid"]
    assert dedup["rows_out"] == expected["rows_out"]
    assert len(list((output / "dedup").glob("part-*.parquet"))) == 2


def test_download_counts_match_the_sample_web(finished: Any) -> None:
    output, expected, _ = finished
    download = report_of(output)["download"]
    assert download["count"] == expected["rows_out"]
    assert download["successes"] == expected["successes"]
    assert download["failed_to_download"] == expected["failed_to_download"]
    assert download["failed_to_resize"] == expected["failed_to_resize"]
    assert sum(download["errors"].values()) == expected["failed_to_download"] + expected["failed_to_resize"]
    kinds = {b["kind"] for b in expected["broken_urls"]}
    assert {"http_404", "html_body"} <= set(download["errors"]) and kinds == {"not_found", "html", "truncated"}


def test_every_sample_has_image_caption_and_json_and_a_unique_key(finished: Any) -> None:
    output, expected, _ = finished
    members: dict[str, set[str]] = {}
    for tar in sorted((output / "images").glob("part-*/*.tar")):
        with tarfile.open(tar) as archive:
            for name in archive.getnames():
                key, ext = name.split(".", 1)
                assert ext not in members.setdefault(key, set()), f"{key}.{ext} twice"
                members[key].add(ext)
    assert len(members) == expected["successes"]
    assert all(exts == {"jpg", "txt", "json"} for exts in members.values())
    good = {tuple(pair) for pair in expected["good_pairs"]}
    assert set(samples(output)) == good


def test_embeddings_and_indexes_cover_every_success(finished: Any) -> None:
    from stages.index.build import RECALL_TARGET

    output, expected, _ = finished
    report = report_of(output)
    assert report["embeddings"]["count"] == expected["successes"]
    assert report["embeddings"]["dim"] > 0
    for name in ("image", "text"):
        index = report["index"][name]
        assert index["ntotal"] == expected["successes"]
        assert index["size_bytes"] == (output / "index" / f"{name}.index").stat().st_size
        assert index["recall_at_10"] >= RECALL_TARGET, index  # what the search-time nprobe is chosen to keep
    assert [f["count"] for f in report["funnel"]][-3:] == [expected["successes"]] * 3


def test_report_lists_every_stage_with_its_tasks_and_duration(finished: Any) -> None:
    output, _, run_id = finished
    report = report_of(output)
    tasks = [(s["name"], s["tasks"]) for s in report["stages"]]
    assert tasks == [("fetch_metadata", 1), ("dedup", 1), ("download_images", 2), ("clip_embeddings", 2), ("curate", 1), ("build_index", 1)]
    assert next(s for s in report["stages"] if s["name"] == "clip_embeddings")["duration_s"] > 0
    # The stages ran one after another within the run: their spans fit in the run's.
    assert sum(s["duration_s"] for s in report["stages"]) <= run_seconds(run_id), report["stages"]
    html = (output / "report" / "report.html").read_text()
    assert f'{report["download"]["successes"]:,}' in html and "recall@10" in html


def test_an_image_query_returns_that_image_first(finished: Any, clip_model: str) -> None:
    import torch
    from all_clip import load_clip
    from laion_search.reader import RunIndex  # plugins/ is on sys.path once airflow is imported
    from PIL import Image

    import hashlib

    output, _, _ = finished
    model, preprocess, _ = load_clip(clip_model, use_jit=False, device="cpu")
    index = RunIndex(str(output))
    tars = sorted((output / "images").glob("part-*/*.tar"))
    images: dict[str, dict[str, bytes]] = {}
    for tar in tars:
        with tarfile.open(tar) as archive:
            images[str(tar)] = {
                m.name.split(".")[0]: archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".jpg")
            }
    # The sample web serves a few images twice (a URL listed with two captions): pick unique ones.
    seen: dict[str, int] = {}
    for data in (d for per_tar in images.values() for d in per_tar.values()):
        digest = hashlib.sha256(data).hexdigest()
        seen[digest] = seen.get(digest, 0) + 1
    for tar in (tars[0], tars[-1]):
        key, data = next((k, d) for k, d in images[str(tar)].items() if seen[hashlib.sha256(d).hexdigest()] == 1)
        image = Image.open(io.BytesIO(data))
        with torch.no_grad():
            vector = model.encode_image(preprocess(image).unsqueeze(0))[0].numpy()
        hits = index.search_vector(vector, k=5)
        assert hits[0].key == key
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_a_rerun_with_the_same_conf_redoes_nothing(finished: Any, run: Any, conf_for: Any, clip_model: str, sample_web: Any) -> None:
    """`make run` twice: the second run continues the same dataset, redoes nothing and
    leaves every file as it was, the report included (it still names the first run)."""
    import hashlib

    output, expected, _ = finished
    web, _, server = sample_web

    def checksums() -> dict[str, str]:
        return {str(p.relative_to(output)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(output.rglob("*")) if p.is_file()}

    before = checksums()
    assert "report/report.json" in before and any(name.endswith(".tar") for name in before)
    requests_before = len(server.logged_requests())
    assert requests_before >= expected["successes"]  # the first run's downloads are in the log
    rerun_id = run(conf_for(web, output, clip_model)).run_id
    # Every marker records when its stage ran (dedup's _stats.json its Spark job's seconds):
    # a stage that ran again would have changed one.
    assert checksums() == before
    assert len(server.logged_requests()) == requests_before, "the rerun downloaded again"
    returned = returned_values(rerun_id)
    assert returned["list_dedup_parts"] == []  # every part downloaded and embedded: no per-part task
    assert returned["build_index"]["skipped"] is True
    assert returned["build_index"]["search"]["skipped"] is True and returned["report"]["skipped"] is True
    assert report_of(output)["download"]["successes"] == expected["successes"]
