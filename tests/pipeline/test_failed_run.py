"""A real run of laion_pipeline whose every download is refused: the stage with nothing to
do fails once, without retries, and the run still ends with a report that says why.

allowed_networks is left empty, so the download guard refuses the sample server on
127.0.0.1 as a private address (what a network outage or a batch of dead links looks like
to the stages after the downloads): no request reaches the server.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
from run_dag import run_pipeline  # scripts/, put on sys.path by this folder's conftest

from sampleweb.hostile import HostileServer
from task_states import task_tries

pytestmark = pytest.mark.heavy

ROWS = 48
NOTHING_TO_INDEX = f"nothing to index: 0 of {ROWS} downloaded: refused_private_address {ROWS}"


@pytest.fixture(scope="module")
def refused_run(airflow_db: str, conf_for: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("refused")
    with HostileServer() as server:
        raw = folder / "raw"
        raw.mkdir()
        with open(raw / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["URL", "TEXT", "SAMPLE_ID"])
            writer.writerows([server.url(f"/good.jpg?i={i}"), f"a photo {i}", str(i)] for i in range(ROWS))
        # No CLIP model is needed: nothing gets as far as embedding.
        conf = {
            **conf_for(folder, folder / "output", "no-model-needed"),
            "metadata_urls": [str(raw / "*.csv")],
            "allowed_networks": [],
        }
        dag_run = run_pipeline(conf)
        requests = dict(server.requests_by_url)
    return dag_run, folder / "output", requests


def test_the_run_fails_and_no_request_left_the_guard(refused_run: Any) -> None:
    dag_run, _, requests = refused_run
    assert str(dag_run.state) == "failed"
    assert requests == {}


def test_nothing_to_index_fails_once(refused_run: Any) -> None:
    """Each part's embeddings task records that its part has no image; curate, finding
    none in any part, fails at once, and build_index does not run."""
    dag_run, _, _ = refused_run
    tries = task_tries("laion_pipeline", dag_run.run_id)
    assert tries["clip_embeddings[0]"] == tries["clip_embeddings[1]"] == ("success", 1), tries
    assert tries["curate"] == ("failed", 1), tries
    assert tries["build_index"][0] == "upstream_failed", tries
    assert tries["download_images[0]"] == tries["download_images[1]"] == ("success", 1), tries
    # The report is written, then fails on purpose (once): the run did not finish.
    assert tries["report"] == ("failed", 1), tries


def test_the_report_counts_every_refused_download(refused_run: Any) -> None:
    _, output, _ = refused_run
    report = json.loads((output / "report" / "report.json").read_text())
    assert report["complete"] is False
    assert report["reason"] == f"curate failed: {NOTHING_TO_INDEX}"
    download = report["download"]
    assert (download["count"], download["successes"], download["failed_to_download"]) == (ROWS, 0, ROWS)
    assert download["errors"] == {"refused_private_address": ROWS}
    assert download["summary"] == f"0 of {ROWS} downloaded: refused_private_address {ROWS}"
    assert report["dedup"]["rows_out"] == ROWS
    assert [(f["step"], f["count"]) for f in report["funnel"]] == [("raw rows", ROWS), ("valid", ROWS), ("unique", ROWS), ("downloaded", 0), ("embedded", 0)]
    states = {s["name"]: (s["state"], s.get("reason")) for s in report["stages"]}
    assert states == {
        "fetch_metadata": ("success", None),
        "dedup": ("success", None),
        "download_images": ("success", None),
        "clip_embeddings": ("success", None),
        "curate": ("failed", NOTHING_TO_INDEX),
        "build_index": ("upstream_failed", None),
    }
    assert not list((output / "embeddings").rglob("*.npy")) and not (output / "index").exists()


def test_the_report_pages_say_why_the_run_did_not_finish(refused_run: Any) -> None:
    from laion_search.report_page import render_report  # plugins/ is on sys.path (pyproject's pythonpath)

    _, output, _ = refused_run
    page = (output / "report" / "report.html").read_text()
    assert f"The run did not finish: curate failed: {NOTHING_TO_INDEX}" in page
    report = json.loads((output / "report" / "report.json").read_text())
    plugin_page = render_report(
        report, run_id=report["run"]["run_id"], samples=[], image_url=str, airflow_run_href=None, search_href="search"
    )
    assert f"The run did not finish: curate failed: {NOTHING_TO_INDEX}" in plugin_page
    assert "<b>0</b> embedded images" in plugin_page
