"""`make run` killed while it adds a second batch to a dataset, then run again: the dataset
equals one that was never killed, each pair once, the first batch untouched; the lock the
killed run held is taken over."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from shard_files import samples, snapshot
from make_run import AirflowHome, MakeRun, SlowWeb
from waiting import wait_until

from demo import demo_conf  # scripts/, on the path through conftest.py

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1800)]


def write_raw(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["URL", "TEXT", "SAMPLE_ID"], *([url, text, str(i)] for i, (url, text) in enumerate(rows))])


def test_a_run_killed_while_a_dataset_grows_is_finished_by_the_next(
    slow_web: SlowWeb, demo_clip_model: str, tmp_path: Path
) -> None:
    home = AirflowHome(tmp_path / "home")
    home.setup()
    server = slow_web.server
    good = [(server.url(f"/good.jpg?growth={i}"), f"photo {i}") for i in range(9)]
    slow = (server.url("/trickle.jpg?growth"), "the slow one")
    data = tmp_path / "data"
    output = data / "output"
    conf = {
        **demo_conf(data, output, demo_clip_model),
        "metadata_urls": [str(data / "raw" / "*.csv")],
        "dedup_partitions": 1, "processes_count": 1, "index_key": "Flat",
        "timeout": 3, "max_download_seconds": 3600,
    }  # fmt: skip
    conf_path = tmp_path / "conf.json"
    conf_path.write_text(json.dumps(conf))

    write_raw(data / "raw" / "one.csv", good[:5])
    assert MakeRun(home, conf_path, tmp_path / "run-1").wait() == 0
    first_images = snapshot(output / "images")
    first_embeddings = snapshot(output / "embeddings" / "img_emb")

    # The second batch: four new pairs, the slow one, and a pair of the first batch again.
    write_raw(data / "raw" / "two.csv", [*good[5:], slow, good[0]])
    slow_web.hold()
    asked = slow_web.slow_requests()
    killed = MakeRun(home, conf_path, tmp_path / "run-2")
    wait_until(lambda: slow_web.slow_requests() > asked, "the new part's download asks for the slow image", process=killed.process)
    killed.kill()
    assert json.loads((output / "_lock.json").read_text())["run_id"] == home.run_of(killed.pid)  # left behind

    slow_web.release()
    again = MakeRun(home, conf_path, tmp_path / "run-3")
    assert again.wait() == 0, again.terminal()[-3000:]
    report = json.loads((output / "report" / "report.json").read_text())

    assert (report["dedup"]["batches"], report["dedup"]["rows_out"], report["dedup"]["duplicates_of_earlier_batches"]) == (2, 10, 1)
    assert samples(output) == sorted(good)  # each good pair once; the slow one failed on its timeout
    assert report["index"]["image"]["ntotal"] == report["embeddings"]["count"] == len(good)
    assert report["latest_batch"]["index_action"] == "added" and report["complete"]
    images = snapshot(output / "images")
    assert {k: images[k] for k in first_images} == first_images
    embeddings = snapshot(output / "embeddings" / "img_emb")
    assert {k: embeddings[k] for k in first_embeddings} == first_embeddings
    # The first batch's images were requested once, by the first run.
    assert all(server.requests_by_url[f"/good.jpg?growth={i}"] == 1 for i in range(5))
    assert not (output / "_lock.json").exists()
