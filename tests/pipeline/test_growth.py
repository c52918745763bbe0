"""A dataset that grows: the sample web's raw files in two batches into one output root.

The first run reads three of the five raw files; the second is given all five. The grown
dataset equals what one run over all five makes (the sample web's expected.json, which
tests/pipeline/test_full_run.py checks a single run against), the second run requests
only the images of its new pairs, and every earlier shard and embedding file is left as
it was. Then the second batch is removed through laion_remove_batch.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from shard_files import samples, snapshot

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1800)]


def report_of(output: Path) -> dict:
    return json.loads((output / "report" / "report.json").read_text())


def path_of(url: str) -> str:
    """What the server's request log names: the path and the query."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def test_a_second_batch_downloads_embeds_and_indexes_only_its_new_pairs(
    airflow_db: str, sample_web: Any, clip_model: str, run: Any, conf_for: Any, tmp_path: Path
) -> None:
    web, expected, server = sample_web
    files = sorted((web / "raw").iterdir())
    assert len(files) == 5
    first_raw, second_raw = tmp_path / "raw-1", tmp_path / "raw-2"
    for folder, batch in ((first_raw, files[:3]), (second_raw, files[3:])):
        folder.mkdir()
        for f in batch:
            shutil.copy(f, folder / f.name)
    output = tmp_path / "output"
    conf = conf_for(web, output, clip_model)

    run({**conf, "metadata_urls": [str(first_raw / "*")]})
    first = report_of(output)
    images_before = snapshot(output / "images")
    embeddings_before = snapshot(output / "embeddings" / "img_emb")
    requests_before = len(server.logged_requests())

    run({**conf, "metadata_urls": [str(first_raw / "*"), str(second_raw / "*")]})
    second = report_of(output)
    requested = Counter(r["path"] for r in server.logged_requests()[requests_before:])

    # The grown dataset is what one run over every raw file makes: same counts, same
    # (URL, caption) samples, one copy each.
    dedup, download = second["dedup"], second["download"]
    assert (dedup["rows_in"], dedup["rows_invalid"], dedup["rows_out"]) == (expected["rows_in"], expected["rows_invalid"], expected["rows_out"])
    assert (download["count"], download["successes"]) == (expected["rows_out"], expected["successes"])
    assert (download["failed_to_download"], download["failed_to_resize"]) == (expected["failed_to_download"], expected["failed_to_resize"])
    assert samples(output) == sorted(tuple(pair) for pair in expected["good_pairs"])
    assert second["index"]["image"]["ntotal"] == second["embeddings"]["count"] == expected["successes"]

    # The second batch: its own numbers; only its new pairs were requested.
    batch = second["latest_batch"]
    assert batch["batch"] == 1 and dedup["batches"] == 2
    assert batch["rows_out"] == expected["rows_out"] - first["dedup"]["rows_out"] > 0
    assert batch["duplicates_of_earlier_batches"] > 0  # the sample web repeats rows across its files
    assert batch["rows_in"] == dedup["rows_in"] - first["dedup"]["rows_in"]
    new_parts = sorted(output.glob("dedup/part-*.parquet"))[-batch["parts"]:]
    new_urls = Counter(path_of(u) for p in new_parts for u in pq.read_table(p, columns=["URL"]).column("URL").to_pylist())
    assert requested == new_urls
    assert batch["downloaded"] == download["successes"] - first["download"]["successes"]
    assert batch["new_vectors"] == batch["downloaded"] and batch["index_action"] == "added"
    assert batch["recall_at_10"] >= 0.95

    # Earlier shards and embedding files were not touched: same bytes, same times.
    images_after = snapshot(output / "images")
    assert {k: images_after[k] for k in images_before} == images_before
    embeddings_after = snapshot(output / "embeddings" / "img_emb")
    assert {k: embeddings_after[k] for k in embeddings_before} == embeddings_before
    assert len(embeddings_after) > len(embeddings_before)

    # Taking the second batch back leaves the first batch's dataset, index included.
    requests_before_removal = len(server.logged_requests())
    run({"output_root": str(output), "batch": 1, "max_index_memory_usage": conf["max_index_memory_usage"],
         "current_memory_available": conf["current_memory_available"]}, "laion_remove_batch")  # fmt: skip
    removed = report_of(output)
    assert (removed["dedup"]["rows_out"], removed["dedup"]["batches"]) == (first["dedup"]["rows_out"], 1)
    assert removed["index"]["image"]["ntotal"] == first["index"]["image"]["ntotal"]
    assert removed["index"]["image"]["action"] == "readded"
    assert samples(output) == sorted(set(samples(output)))
    assert snapshot(output / "images") == images_before
    assert snapshot(output / "embeddings" / "img_emb") == embeddings_before
    assert len(server.logged_requests()) == requests_before_removal
    # A later run over the same raw files leaves the removed batch's files out.
    run({**conf, "metadata_urls": [str(first_raw / "*"), str(second_raw / "*")]})
    assert report_of(output)["dedup"]["rows_out"] == first["dedup"]["rows_out"]
    assert len(server.logged_requests()) == requests_before_removal
