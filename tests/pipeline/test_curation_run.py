"""Curation in whole runs of the DAG on the sample web's images: blocklists, near duplicates,
the CLIP-score filter, the index and the subset over the kept samples only.

The raw file is written here from the sample web's good images: 20 distinct images, one of
them copied under a second URL (byte-identical images under two URLs) and one URL listed
twice with two captions. The demo's weights are untrained, so the scores carry no meaning:
these tests check the mechanics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_files import snapshot
from task_states import task_tries

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1800)]


def www_file(web: Path, url: str) -> Path:
    return web / "www" / urlsplit(url).path.lstrip("/")


def table_of(folder: Path, pattern: str = "*.parquet") -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob(pattern)))


def subset_keys(output: Path) -> Counter:
    """How many files each sample of subset/ has."""
    import tarfile

    found: Counter = Counter()
    for tar in sorted((output / "subset").glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                found[member.name.split(".")[0]] += 1
    return found


def searched(output: Path, decisions: pa.Table) -> dict[str, Any]:
    """What the search service's reader finds in the published index: its rows' keys, the
    first hit of three kept samples' own vectors, and whether a removed sample is found."""
    from laion_search.reader import RunIndex  # plugins/ is on sys.path once airflow is imported

    index = RunIndex(str(output))
    rows = decisions.to_pylist()
    kept = sorted(r["key"] for r in rows if r["reason"] is None)
    removed = next(r["key"] for r in rows if r["reason"])
    return {
        "keys": sorted(index.rows.row(i)["image_path"] for i in range(len(index.rows))),
        "first_hits": {key: index.search_vector(index.vector_of(key), k=1)[0].key for key in kept[:3]},
        "removed_found": index.rows.position(removed) is not None,
    }


@pytest.fixture(scope="module")
def curated_runs(airflow_db: str, sample_web: Any, clip_model: str, run: Any, conf_for: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    web, expected, server = sample_web
    tmp = tmp_path_factory.mktemp("curation")
    good = [pair for pair in expected["good_pairs"] if "?" not in pair[0]][:20]
    original = good[0][0]
    mirror = original.rsplit(".", 1)[0] + "-mirror.jpg"  # the same bytes under a second URL
    shutil.copy(www_file(web, original), www_file(web, mirror))
    rows = [*good, (mirror, "a mirror of the first image"), (good[1][0], "the second image, captioned again")]
    raw = tmp / "raw" / "metadata.csv"
    raw.parent.mkdir()
    with open(raw, "w", newline="") as f:
        csv.writer(f).writerows([["URL", "TEXT"], *rows])
    blocked_urls = [good[2][0], good[3][0]]
    blocked_images = [good[4][0], good[5][0]]
    url_list, image_list = tmp / "urls.txt", tmp / "images.txt"
    url_list.write_text(f"{hashlib.sha256(blocked_urls[0].encode()).hexdigest()}\n\n{hashlib.md5(blocked_urls[1].encode()).hexdigest().upper()}\n")
    image_list.write_text(
        hashlib.sha256(www_file(web, blocked_images[0]).read_bytes()).hexdigest() + "\n"
        + hashlib.md5(www_file(web, blocked_images[1]).read_bytes()).hexdigest() + "\n"
    )  # fmt: skip
    output = tmp / "output"
    conf = {
        **conf_for(web, output, clip_model),
        "metadata_urls": [str(raw)],
        "blocked_url_hashes": [str(url_list)],
        "blocked_image_hashes": [str(image_list)],
        "near_duplicate_threshold": 0.999,
        "export_subset": True,
        "index_key": "Flat",
    }
    requests_before = len(server.logged_requests())
    run(conf)
    requested = Counter(r["path"] for r in server.logged_requests()[requests_before:])
    first = {
        "report": json.loads((output / "report" / "report.json").read_text()),
        "decisions": table_of(output / "curation" / "decisions"),
        "embeddings": snapshot(output / "embeddings"),
        "images": snapshot(output / "images"),
        "subset": subset_keys(output),
        "search": searched(output, table_of(output / "curation" / "decisions")),
        "page": (output / "report" / "report.html").read_text(),
    }
    # Again with a CLIP-score threshold: the median score of the samples kept so far.
    kept_scores = sorted(r["clip_score"] for r in first["decisions"].to_pylist() if r["reason"] is None)
    threshold = kept_scores[len(kept_scores) // 2]
    run({**conf, "min_clip_score": threshold})
    second = {
        "report": json.loads((output / "report" / "report.json").read_text()),
        "decisions": table_of(output / "curation" / "decisions"),
        "subset": subset_keys(output),
        "search": searched(output, table_of(output / "curation" / "decisions")),
    }
    paths = {"blocked_urls": blocked_urls, "blocked_images": blocked_images, "mirror": mirror, "original": original, "twice": good[1][0]}
    return output, requested, first, second, threshold, paths


def test_blocked_urls_are_never_requested_and_blocked_images_never_kept(curated_runs: Any) -> None:
    output, requested, first, _, _, paths = curated_runs
    assert all(urlsplit(u).path not in requested for u in paths["blocked_urls"])
    assert all(requested[urlsplit(u).path] == 1 for u in paths["blocked_images"])  # fetched once, then dropped
    curate = first["report"]["curate"]
    assert (curate["blocked_url"], curate["blocked_image"]) == (2, 2)
    downloaded = table_of(output / "images", "part-*/*.parquet").to_pylist()
    successes = {r["url"] for r in downloaded if r["status"] == "success"}
    assert not successes & set(paths["blocked_images"]) and not successes & set(paths["blocked_urls"])
    assert {r["error_message"] for r in downloaded if r["url"] in paths["blocked_images"]} == {"blocked_image"}
    embedded_urls = set(table_of(output / "embeddings" / "metadata").column("url").to_pylist())
    assert not embedded_urls & {*paths["blocked_images"], *paths["blocked_urls"]}  # so not in the index either
    # Nothing of the lists reaches the report: only counts.
    text = (output / "report" / "report.json").read_text() + (output / "report" / "report.html").read_text()
    for digest in (output.parent / "urls.txt").read_text().split() + (output.parent / "images.txt").read_text().split():
        assert digest.lower() not in text.lower()


def test_byte_identical_images_are_one_near_duplicate_group(curated_runs: Any) -> None:
    output, _, first, _, _, paths = curated_runs
    rows = first["decisions"].to_pylist()
    meta = {r["key"]: r for r in table_of(output / "embeddings" / "metadata").to_pylist()}
    by_url: dict[str, list[dict]] = {}
    for r in rows:
        by_url.setdefault(meta[r["key"]]["url"], []).append(r)
    # The mirror and its original: one removed as a duplicate of the other, at cosine 1.
    pair = by_url[paths["mirror"]] + by_url[paths["original"]]
    assert sorted(r["reason"] or "kept" for r in pair) == ["kept", "near_duplicate"]
    removed = next(r for r in pair if r["reason"])
    assert removed["near_duplicate_of"] == next(r["key"] for r in pair if not r["reason"]) and removed["near_duplicate_cosine"] == 1.0
    # One URL with two captions: the same image twice, one removed.
    assert sorted(r["reason"] or "kept" for r in by_url[paths["twice"]]) == ["kept", "near_duplicate"]
    curate = first["report"]["curate"]
    assert curate["near_duplicates"] == sum(r["reason"] == "near_duplicate" for r in rows) >= 2
    assert curate["kept"] == sum(r["reason"] is None for r in rows) == curate["embedded"] - curate["near_duplicates"]


def test_the_index_and_the_subset_hold_exactly_the_kept_samples(curated_runs: Any) -> None:
    _, _, first, _, _, _ = curated_runs
    rows = first["decisions"].to_pylist()
    kept = sorted(r["key"] for r in rows if r["reason"] is None)
    assert first["report"]["index"]["image"]["ntotal"] == len(kept)
    assert first["search"]["keys"] == kept
    # Searching by a kept sample's own vector finds that sample first: rows and vectors agree.
    assert all(hit == key for key, hit in first["search"]["first_hits"].items()), first["search"]["first_hits"]
    assert first["search"]["removed_found"] is False
    # subset/: every kept sample with its three files (jpg, txt, json), and nothing else.
    assert first["subset"] == Counter({key: 3 for key in kept})


def test_a_rerun_with_a_clip_score_threshold_changes_only_the_curation(curated_runs: Any) -> None:
    output, _, first, second, threshold, _ = curated_runs
    assert snapshot(output / "embeddings") == first["embeddings"]
    assert snapshot(output / "images") == first["images"]
    rows = second["decisions"].to_pylist()
    for r in rows:
        if r["clip_score"] < threshold:
            assert r["reason"] == "below_clip_score", r
        else:
            assert r["reason"] in (None, "near_duplicate"), r
    curate = second["report"]["curate"]
    assert curate["min_clip_score"] == threshold
    assert curate["below_clip_score"] == sum(r["reason"] == "below_clip_score" for r in rows) > 0
    kept = sorted(r["key"] for r in rows if r["reason"] is None)
    assert second["report"]["index"]["image"]["ntotal"] == len(kept) < first["report"]["index"]["image"]["ntotal"]
    assert second["subset"] == Counter({key: 3 for key in kept})
    assert second["search"]["keys"] == kept


def test_both_report_pages_show_the_histogram_and_the_removed_pairs(curated_runs: Any) -> None:
    from laion_search.report_page import render_report

    output, _, first, second, threshold, _ = curated_runs
    # The histogram marks the threshold once there is one (the second run).
    second_page = (output / "report" / "report.html").read_text()
    assert 'id="clip-score-histogram"' in second_page and f"min_clip_score {threshold:g}" in second_page
    # The first run's pairs (in the second, a pair's sample may fall below the threshold first).
    report, page = first["report"], first["page"]
    pairs = report["curate"]["near_duplicate_pairs"]
    assert pairs and report["curate"]["clip_score_histogram"]["counts"]
    assert page.count('<figure class="pair">') == len(pairs) and page.count('src="data:image/jpeg;base64,') >= 2 * len(pairs)
    plugin_page = render_report(
        report, run_id=report["run"]["run_id"], samples=[], image_url=lambda key: f"image?key={key}", airflow_run_href=None, search_href="search"
    )
    assert 'id="clip-score-histogram"' in plugin_page
    for pair in pairs:
        assert f'src="image?key={pair["key"]}"' in plugin_page and f'src="image?key={pair["duplicate_of"]}"' in plugin_page


def test_a_bad_blocklist_fails_the_run_in_its_first_task_naming_the_param_file_and_line(
    airflow_db: str, sample_web: Any, clip_model: str, conf_for: Any, tmp_path: Path
) -> None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from run_dag import run_pipeline  # scripts/, put on sys.path by this folder's conftest
    from sqlalchemy import select

    web, _, server = sample_web
    good = tmp_path / "good.txt"
    good.write_text(hashlib.sha256(b"x").hexdigest() + "\n")
    bad = tmp_path / "bad.txt"
    secret = hashlib.sha256(b"listed").hexdigest()
    bad.write_text(f"{secret}\n{secret[:-1]}\n")  # line 2: 63 hex digits
    output = tmp_path / "output"
    requests_before = len(server.logged_requests())
    conf = {**conf_for(web, output, clip_model), "blocked_url_hashes": [str(good)], "blocked_image_hashes": [str(bad)]}
    dag_run = run_pipeline(conf)

    assert str(dag_run.state).endswith("failed")
    tries = task_tries("laion_pipeline", dag_run.run_id)
    assert tries["fetch_metadata"] == ("failed", 1), tries  # not retried: the same list fails the same way
    assert tries["dedup"][0] == "upstream_failed", tries
    with create_session() as session:
        failure = session.scalars(
            select(XComModel).where(XComModel.run_id == dag_run.run_id, XComModel.task_id == "fetch_metadata", XComModel.key == "failure")
        ).one()
    reason = XComModel.deserialize_value(failure)["reason"]
    assert f"blocked_image_hashes: {bad} line 2: 63 hex digits" in reason and secret[:16] not in reason
    assert not output.exists() and len(server.logged_requests()) == requests_before  # no work at all
