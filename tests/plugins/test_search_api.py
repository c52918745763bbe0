"""The search API inside Airflow's own app, over a real finished run: results, images, errors, auth."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from waiting import wait_until

# The first test of the session that uses the plugins' fixtures pays for their pipeline run.
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def client(airflow_client: Any, login: Any) -> Any:
    airflow_client.headers.update(login(airflow_client, "viewer"))
    yield airflow_client
    airflow_client.headers.pop("Authorization")


def search(client: Any, run_id: str, **params: Any) -> Any:
    return client.get("/laion/api/search", params={"run": run_id, **params})


def test_the_plugin_is_mounted_and_linked_from_the_navigation(client: Any) -> None:
    plugins = client.get("/api/v2/plugins").json()["plugins"]
    plugin = next(p for p in plugins if p["name"] == "laion_search")
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/laion"
    views = {v["url_route"]: v for v in plugin["external_views"]}
    assert views["laion-search"]["destination"] == "nav" and views["laion-search"]["href"] == "laion/search"
    assert views["laion-reports"]["destination"] == "nav"
    assert views["laion-run-report"]["destination"] == "dag_run" and "{RUN_ID}" in views["laion-run-report"]["href"]


def test_the_finished_run_is_offered_with_its_index(client: Any, search_run: dict) -> None:
    runs = client.get("/laion/api/runs").json()
    run = next(r for r in runs if r["run_id"] == search_run["run_id"])
    assert run["source"] == "airflow"
    assert run["vectors"] == search_run["expected"]["successes"]
    image_index = json.loads((Path(search_run["output_root"]) / "report" / "report.json").read_text())["index"]["image"]
    assert run["has_report"] and (run["index_key"], run["recall_at_10"]) == (image_index["index_key"], image_index["recall_at_10"])


def test_a_text_query_returns_k_results_with_their_images(client: Any, search_run: dict, tar_samples: dict) -> None:
    response = search(client, search_run["run_id"], text="a photo of a cat", k=7)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"kind": "text", "text": "a photo of a cat"} and len(body["results"]) == 7
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["results"]:
        truth = json.loads(tar_samples[hit["key"]]["json"])
        assert (hit["caption"], hit["url"]) == (truth["caption"], truth["url"])
        image = client.get(hit["thumbnail"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content == tar_samples[hit["key"]]["jpg"]
        assert Image.open(io.BytesIO(image.content)).size == (256, 256)


@pytest.mark.parametrize("pick", [0, -1])
def test_an_uploaded_image_finds_itself_first(client: Any, search_run: dict, tar_samples: dict, unique_image_keys: list, pick: int) -> None:
    key = unique_image_keys[pick]
    response = client.post(
        "/laion/api/search",
        data={"run": search_run["run_id"], "k": "5"},
        files={"image": ("upload.jpg", tar_samples[key]["jpg"], "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    first = response.json()["results"][0]
    assert first["key"] == key
    assert first["score"] == pytest.approx(1.0, abs=1e-3)


def test_a_png_upload_is_accepted(client: Any, search_run: dict, tar_samples: dict, unique_image_keys: list) -> None:
    key = unique_image_keys[3]
    png = io.BytesIO()
    Image.open(io.BytesIO(tar_samples[key]["jpg"])).save(png, format="PNG")
    response = client.post("/laion/api/search", data={"run": search_run["run_id"]}, files={"image": ("x.png", png.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["key"] == key


def test_a_sample_key_finds_itself_first(client: Any, search_run: dict, unique_image_keys: list) -> None:
    key = unique_image_keys[len(unique_image_keys) // 2]
    body = search(client, search_run["run_id"], key=key, k=3).json()
    assert body["results"][0]["key"] == key and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def detail(response: Any) -> str:
    return json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    "params, status, says",
    [
        ({"text": "cat", "k": 0}, 422, "greater than or equal to 1"),
        ({"text": "cat", "k": 101}, 422, "less than or equal to 100"),
        ({"text": "x" * 501}, 422, "at most 500 characters"),
        ({"text": ""}, 422, "at least 1 character"),
        ({}, 422, "exactly one of text, key or image"),
        ({"text": "cat", "key": "000000000000"}, 422, "exactly one of text, key or image"),
        ({"key": "../etc/passwd"}, 422, "pattern"),
        ({"key": "999999999999"}, 404, "no sample '999999999999'"),
    ],
)
def test_bad_queries_get_the_documented_status(client: Any, search_run: dict, params: dict, status: int, says: str) -> None:
    response = search(client, search_run["run_id"], **params)
    assert response.status_code == status, response.text
    assert says in detail(response)


def test_an_unknown_run_is_a_404_that_says_which_runs_exist(client: Any, search_run: dict) -> None:
    response = search(client, "no-such-run", text="cat")
    assert response.status_code == 404
    assert "no finished laion_pipeline run 'no-such-run' with an index" in response.json()["detail"]
    assert search_run["run_id"] in response.json()["detail"]
    assert client.get("/laion/api/image", params={"run": "no-such-run", "key": "000000000000"}).status_code == 404
    assert client.get("/laion/api/image", params={"run": search_run["run_id"], "key": "999999999999"}).status_code == 404


@pytest.mark.parametrize(
    "payload, content_type, status, says",
    [
        (b"plain text, not an image", "text/plain", 415, "must be JPEG, PNG, GIF or WebP"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 100, "image/jpeg", 415, "cannot decode"),
        (b"\xff\xd8\xff" + b"\0" * (8 << 20), "image/jpeg", 413, "larger than"),
    ],
)
def test_bad_uploads_get_the_documented_status(client: Any, search_run: dict, payload: bytes, content_type: str, status: int, says: str) -> None:
    response = client.post("/laion/api/search", data={"run": search_run["run_id"]}, files={"image": ("x", payload, content_type)})
    assert response.status_code == status, response.text
    assert says in detail(response)


def test_an_image_with_too_many_pixels_is_a_413(client: Any, search_run: dict) -> None:
    huge = io.BytesIO()
    Image.new("L", (8000, 6000)).save(huge, format="PNG")  # 48 MP of one colour: a few KB
    response = client.post("/laion/api/search", data={"run": search_run["run_id"]}, files={"image": ("x.png", huge.getvalue(), "image/png")})
    assert response.status_code == 413 and "pixels" in detail(response)


def test_the_openapi_schema_documents_every_status(client: Any) -> None:
    schema = client.get("/laion/openapi.json").json()
    get, post = schema["paths"]["/api/search"]["get"], schema["paths"]["/api/search"]["post"]
    assert {"200", "401", "403", "404", "422"} <= set(get["responses"])
    assert {"200", "401", "403", "404", "413", "415", "422"} <= set(post["responses"])
    k = next(p for p in get["parameters"] if p["name"] == "k")
    assert (k["schema"]["minimum"], k["schema"]["maximum"]) == (1, 100)
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_nothing_is_served_without_a_login(airflow_client: Any, search_run: dict) -> None:
    anonymous = {"Authorization": ""}
    for path in ("/laion/api/runs", f"/laion/api/search?run={search_run['run_id']}&text=cat", "/laion/api/metrics",
                 f"/laion/api/image?run={search_run['run_id']}&key=000000000000", f"/laion/api/report?run={search_run['run_id']}"):
        response = airflow_client.get(path, headers=anonymous)
        assert response.status_code == 401, path
    page = airflow_client.get("/laion/search", headers=anonymous, follow_redirects=False)
    assert page.status_code == 303 and "/auth/login" in page.headers["location"]
    forged = airflow_client.get("/laion/api/runs", headers={"Authorization": "Bearer not-a-jwt"})
    assert forged.status_code == 403


def test_the_report_api_returns_report_json(client: Any, search_run: dict) -> None:
    report = json.loads((Path(search_run["output_root"]) / "report" / "report.json").read_text())
    assert client.get("/laion/api/report", params={"run": search_run["run_id"]}).json() == report


def test_the_report_page_shows_the_report_numbers_as_pictures(client: Any, search_run: dict) -> None:
    report = json.loads((Path(search_run["output_root"]) / "report" / "report.json").read_text())
    page = client.get("/laion/report", params={"run": search_run["run_id"]})
    assert page.status_code == 200
    html = page.text
    for chart in ("stage-durations", "funnel", "shards", "failure-reasons", "recall"):
        assert f'<svg id="{chart}"' in html, chart
    for step in report["funnel"]:
        assert f'{step["count"]:,}' in html
    for stage in report["stages"]:
        assert f'{stage["duration_s"]:.1f} s' in html
    for shard in report["download"]["shards"]:
        assert f'({shard["successes"]}/{shard["count"]})' in html
    for reason, count in report["download"]["errors"].items():
        assert reason in html and f"{count:,}" in html
    for index in report["index"].values():
        assert f'{index["size_bytes"]:,}' in html and str(index["index_key"]) in html and str(index["recall_at_10"]) in html
    assert f'{100 * report["download"]["success_rate"]:.2f}%' in html
    assert html.count('<figure class="sample">') == 12
    assert f'href="../dags/laion_pipeline/runs/{search_run["run_id"].replace(":", "%3A").replace("+", "%2B")}"' in html


def test_metrics_report_query_latency(client: Any, search_run: dict) -> None:
    before = client.get("/laion/api/metrics").json()["search"]
    search(client, search_run["run_id"], text="latency probe")
    metrics = client.get("/laion/api/metrics").json()
    assert metrics["search"]["queries"] == before["queries"] + 1
    text = metrics["search"]["by_kind"]["text"]
    assert text["queries"] == before["by_kind"].get("text", {"queries": 0})["queries"] + 1
    assert isinstance(text["p50_ms"], float) and isinstance(text["p95_ms"], float)  # measured, not asserted
    loaded = next(r for r in metrics["loaded_runs"] if r["run_id"] == search_run["run_id"])
    assert loaded["memory_mapped"] is True


def test_a_new_index_event_reloads_the_index(client: Any, search_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the run, offered through LAION_SEARCH_ROOTS, gets a smaller index and Asset events:
    reloaded once its search files name the new index."""
    import inspect

    import faiss
    import numpy as np
    from laion_search.api import service
    from sqlalchemy import select

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from stages.npy import load_embeddings
    from stages.index import INDEX_ASSET

    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.name == INDEX_ASSET))
        events = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id)).all()
    assert any(e.source_dag_id == "laion_pipeline" and e.source_task_id == "build_index" for e in events)

    copy = tmp_path / "copy"
    shutil.copytree(search_run["output_root"], copy)
    report = json.loads((copy / "report" / "report.json").read_text())
    report["run"]["run_id"] = "copied_run"
    (copy / "report" / "report.json").write_text(json.dumps(report))
    monkeypatch.setenv("LAION_SEARCH_ROOTS", str(copy))
    service.catalog.refresh()
    metrics = lambda: client.get("/laion/api/metrics").json()  # noqa: E731
    vectors = lambda: next(r for r in metrics()["loaded_runs"] if r["run_id"] == "copied_run")["vectors"]  # noqa: E731
    assert search(client, "copied_run", text="cat").status_code == 200
    total, reloads = vectors(), metrics()["index_reloads"]

    embeddings = np.ascontiguousarray(load_embeddings(str(copy / "embeddings" / "img_emb"))[: total - 10])
    smaller = faiss.IndexFlatIP(embeddings.shape[1])
    smaller.add(embeddings)
    # Replaced by rename, as build_index publishes: the loaded index maps the old file's pages.
    faiss.write_index(smaller, str(copy / "index" / "image.index.new"))
    os.replace(copy / "index" / "image.index.new", copy / "index" / "image.index")
    built = json.loads((copy / "index" / "_SUCCESS.json").read_text())
    built["image"].update(index_key="Flat", index_param="", ntotal=total - 10)
    (copy / "index" / "_SUCCESS.json").write_text(json.dumps({**built, "input_fingerprint": "rebuilt"}))
    # Counted from here: the service's looks at the Asset's events (the real query answers them).
    service_module, looks = inspect.getmodule(type(service)), []
    latest_event_id = service_module.latest_index_event_id

    def looked() -> int | None:
        looks.append(latest_event_id())
        return looks[-1]

    monkeypatch.setattr(service_module, "latest_index_event_id", looked)
    # Searched until the service has looked at the events since the change: none is new.
    wait_until(lambda: search(client, "copied_run", text="cat").status_code == 200 and len(looks) > 0, "look at the events", timeout=60)
    assert vectors() == total and metrics()["index_reloads"] == reloads, "without an event the loaded index is kept"

    def new_event() -> None:
        with create_session() as session:
            session.add(AssetEvent(asset_id=asset.id, extra={}))

    # An event while the search files are still those of the old index: it is kept.
    new_event()
    wait_until(lambda: search(client, "copied_run", text="cat").status_code == 200 and looks[-1] != looks[0], "look at the new event", timeout=60)
    assert vectors() == total and metrics()["index_reloads"] == reloads, "a half-published index is not loaded"

    # build_index's search marker, written last, names the new index; then its event.
    searched = json.loads((copy / "index" / "_SEARCH.json").read_text())
    (copy / "index" / "_SEARCH.json").write_text(json.dumps({**searched, "index_fingerprint": "rebuilt"}))
    new_event()
    wait_until(lambda: search(client, "copied_run", text="cat", k=100).status_code == 200 and vectors() != total, "reload", timeout=60)
    assert vectors() == total - 10 and metrics()["index_reloads"] == reloads + 1


def test_the_loaded_index_answers_until_the_search_files_name_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run grown by one batch, built and published here by the real stages, served by a service
    that checks the run's markers on every use."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from laion_search import service as service_module
    from laion_search.catalog import Run
    from laion_search.service import IndexBeingPublished, SearchService

    from stages.index.build import IndexSettings, build_indexes
    from stages.index.search_files import publish_search_files
    from stages.layout import RunLayout

    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 1}, {"parts": []})
    rng = np.random.default_rng(0)

    def embed_batch(partition: int, rows: int) -> None:
        for sub in ("img_emb", "text_emb"):
            vectors = rng.normal(size=(rows, 16)).astype("float32")
            Path(layout.curated_files(sub)).mkdir(parents=True, exist_ok=True)
            np.save(Path(layout.curated_files(sub), f"{sub}_{partition:05d}.npy"), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        Path(layout.curated_files("metadata")).mkdir(parents=True, exist_ok=True)
        keys = [f"{partition:05d}{i:07d}" for i in range(rows)]
        pq.write_table(pa.table({"image_path": keys}), Path(layout.curated_files("metadata"), f"metadata_{partition:05d}.parquet"))
        # As curate leaves them: the kept samples (here all) in curated/, its marker.
        layout.embeddings_marker.mark_done({"input_fingerprint": f"e{partition}", "clip_model": "m"}, {})
        layout.curation_marker.mark_done({"input_fingerprint": f"e{partition}", "settings": {}}, {"kept": rows})

    monkeypatch.setattr(service_module, "latest_index_event_id", lambda: None)  # no Airflow database here
    run = Run("grown", str(tmp_path), "LAION_SEARCH_ROOTS")
    service = SearchService(recheck_seconds=0)
    embed_batch(0, 200)
    build_indexes(layout, IndexSettings(index_key="Flat"), recall_queries=50)
    with pytest.raises(IndexBeingPublished, match="no complete index publication"):
        service.loaded(run)  # never loaded: only a complete publication is
    publish_search_files(layout)
    first = service.loaded(run)
    assert first.index.index.ntotal == 200

    embed_batch(1, 100)
    assert build_indexes(layout, IndexSettings(index_key="Flat"), recall_queries=50)["image"]["action"] == "added"
    kept = service.loaded(run)  # the new index is published, its search files are not yet
    assert kept is first and kept.index.index.ntotal == 200 and service.reloads == 0
    assert kept.index.search_vector(np.load(Path(layout.curated_files("img_emb"), "img_emb_00000.npy"))[7], k=1)[0].key == "000000000007"
    with pytest.raises(IndexBeingPublished):
        SearchService(recheck_seconds=0).loaded(run)

    publish_search_files(layout)
    reloaded = service.loaded(run)
    assert reloaded is not first and reloaded.index.index.ntotal == 300 and service.reloads == 1
    assert reloaded.index.search_vector(np.load(Path(layout.curated_files("img_emb"), "img_emb_00001.npy"))[5], k=1)[0].key == "000010000005"
