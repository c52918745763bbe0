"""A failed download_images task, cleared with `airflow tasks clear --only-failed` (what the
UI's Clear does): only that part is downloaded again, the other part's task is not rerun,
and the run ends with every sample of both parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sampleweb.hostile import HostileServer
from stages.layout import RunLayout

pytestmark = pytest.mark.heavy

RUN_ID = "clear-failed"
ROWS = 16


def test_clearing_a_failed_part_downloads_only_that_part(
    airflow_services: Any, run_conf: Any, write_csv: Any, demo_clip_model: str, tmp_path: Path
) -> None:
    services = airflow_services
    output = tmp_path / "output"
    with HostileServer() as server:
        write_csv(tmp_path / "raw" / "metadata.csv", [[server.url(f"/good.jpg?i={i}"), f"photo {i}", str(i)] for i in range(ROWS)])
        conf = run_conf(demo_clip_model, metadata_urls=[str(tmp_path / "raw" / "*.csv")], output_root=str(output), dedup_partitions=2)
        trigger = services.cli(
            "dags", "trigger", "laion_pipeline", "--run-id", RUN_ID, "--logical-date", "2020-01-06T00:00:00+00:00",
            "--conf", json.dumps(conf),
        )  # fmt: skip
        assert trigger.returncode == 0, trigger.stderr[-2000:]
        # Take part-00001 away as soon as dedup published it (its marker is written last), before
        # any download task starts: that part's download task fails every try.
        layout = RunLayout(str(output))
        part = Path(layout.part("part-00001"))
        services.wait_until(lambda: layout.dedup_marker.read() is not None, "dedup output published", 600, RUN_ID)
        shutil.move(part, tmp_path / "aside.parquet")
        services.wait_for_run(RUN_ID, "failed", timeout=600)
        failed = services.task_tries("laion_pipeline", RUN_ID)
        requests_before = dict(server.requests_by_url)

        shutil.move(tmp_path / "aside.parquet", part)
        cleared = services.cli(
            "tasks", "clear", "laion_pipeline", "-t", "download_images", "--only-failed", "--downstream", "--yes",
            "-s", "2020-01-06", "-e", "2020-01-06",
        )  # fmt: skip
        assert cleared.returncode == 0, cleared.stderr[-2000:]
        services.wait_for_run(RUN_ID, "success", timeout=600)
        after = services.task_tries("laion_pipeline", RUN_ID)
        requests_after = dict(server.requests_by_url)

    assert failed["download_images[0]"] == ("success", 1)
    assert failed["download_images[1]"][0] == "failed"
    # Part 0 was embedded while part 1 failed: its embeddings depend on its own download only.
    assert failed["clip_embeddings[0]"] == ("success", 1)
    assert failed["clip_embeddings[1]"][0] == failed["build_index"][0] == "upstream_failed"
    assert after["download_images[0]"] == ("success", 1), "the part that had succeeded was downloaded again"
    assert after["download_images[1]"][0] == "success"
    # Every task succeeded; export_subset is skipped (the run's export_subset is false).
    assert {t: s for t, (s, _) in after.items() if s != "success"} == {"export_subset": "skipped"}, after

    # Only part-00001's samples were requested after the clear, each once.
    asked_again = {url: n - requests_before.get(url, 0) for url, n in requests_after.items() if n != requests_before.get(url, 0)}
    assert set(asked_again.values()) == {1} and 0 < len(asked_again) < ROWS
    assert len(requests_after) == ROWS
    report = json.loads((output / "report" / "report.json").read_text())
    assert report["download"]["successes"] == ROWS and report["index"]["image"]["ntotal"] == ROWS
