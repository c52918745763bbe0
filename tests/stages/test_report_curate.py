"""The report's curation: counts by reason from the curation marker and the blocklists'
records, the funnel through the filters, and report.html's clip_score histogram with its
threshold and the removed near-duplicate pairs, their thumbnails read from the shards."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.curate.blocklists import drop_blocked_urls, load_blocklist
from stages.index.search_files import write_offsets
from stages.layout import RunLayout
from stages.report import build_report, render_html, write_report
from stages.report_curate import tar_member_offsets
from shard_files import mark_embedded

URLS = [f"http://127.0.0.1:1/img/{i}.jpg" for i in range(11)]
BLOCKED_URLS = URLS[:2]
# One solid colour per downloaded sample: a thumbnail shows which sample it is.
COLORS = {f"00000000000{i}": (40 * i, 255 - 40 * i, 90) for i in range(6)}
PAIRS = [
    {"key": "000000000004", "duplicate_of": "000000000001", "cosine": 0.9912},
    {"key": "000000000005", "duplicate_of": "000000000002", "cosine": 0.9731},
]
HISTOGRAM = {"edges": [round(e, 3) for e in np.linspace(-1.0, 1.0, 21).tolist()], "counts": [0] * 12 + [1, 2, 3] + [0] * 5}
INDEXED = {"index_key": "Flat", "ntotal": 3, "size_bytes": 100, "recall_at_10": 1.0, "build_seconds": 0.1}


def jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), color).save(out, format="JPEG")
    return out.getvalue()


def write_shard(layout: RunLayout, part: str, shard: str, stats: dict) -> Path:
    """A finished webdataset shard as img2dataset writes it: jpg, txt and json per sample, then its stats."""
    tar = Path(layout.part_images(part), f"{shard}.tar")
    with tarfile.open(tar, "w") as archive:
        for key, color in COLORS.items():
            for ext, data in (("jpg", jpeg(color)), ("txt", f"caption {key}".encode()), ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    Path(layout.part_images(part), f"{shard}_stats.json").write_text(json.dumps(stats))
    return tar


def curation_numbers(**changed: object) -> dict:
    return {
        "embedded": 6, "blocked_after_download": 0, "below_clip_score": 1, "classifier": 0, "near_duplicates": 2, "kept": 3,
        "clip_score_mean": 0.31, "min_clip_score": 0.3, "near_duplicate_threshold": 0.95, "max_classifier_score": None,
        "classifier_name": None, "clip_score_histogram": HISTOGRAM, "near_duplicate_pairs": PAIRS, **changed,
    }  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> RunLayout:
    """A curated run: 11 unique rows, 2 URLs blocked before download (by the real blocklist
    code), 1 image blocked at download, 6 downloaded and embedded, 3 kept and indexed."""
    layout = RunLayout(str(tmp_path / "run"))
    layout.dedup_marker.mark_done(
        {"input_fingerprint": "d", "partitions": 1},
        {"parts": ["part-00000.parquet"], "rows_in": 12, "rows_invalid": 1, "rows_out": 11},
    )
    pq.write_table(pa.table({"URL": URLS, "TEXT": [f"caption {i}" for i in range(11)]}), layout.part("part-00000"))
    blocklist = tmp_path / "blocked_urls.txt"
    blocklist.write_text("".join(hashlib.sha256(u.encode()).hexdigest() + "\n" for u in BLOCKED_URLS))
    Path(layout.part_images("part-00000")).mkdir(parents=True)
    blocked = load_blocklist([str(blocklist)], "blocked_url_hashes")
    assert drop_blocked_urls(layout.part("part-00000"), layout.part_images("part-00000"), blocked, dedup_version="v1")[1] == 2
    stats = {"count": 9, "successes": 6, "failed_to_download": 3, "status_dict": {"success": 6, "blocked_image": 1, "HTTP Error 404": 2}}
    write_shard(layout, "part-00000", "0000000000", stats)
    mark_embedded(layout, 6)
    layout.curation_marker.mark_done({"input_fingerprint": "c", "settings": {}}, curation_numbers())
    layout.index_marker.mark_done({"input_fingerprint": "i"}, {"image": INDEXED, "text": INDEXED})
    return layout


def test_the_report_counts_every_removal_by_reason(run: RunLayout) -> None:
    report = build_report(run, {}, {"run_id": "r1"})
    assert report["curate"] == {
        "state": "success", "blocked_url": 2, "blocked_image": 1,
        "embedded": 6, "blocked_after_download": 0, "below_clip_score": 1, "classifier": 0, "near_duplicates": 2, "kept": 3,
        "clip_score_mean": 0.31, "min_clip_score": 0.3, "near_duplicate_threshold": 0.95, "max_classifier_score": None,
        "classifier_name": None, "clip_score_histogram": HISTOGRAM, "near_duplicate_pairs": PAIRS,
    }  # fmt: skip
    assert report["funnel"] == [
        {"step": "raw rows", "count": 12},
        {"step": "valid", "count": 11},
        {"step": "unique", "count": 11},
        {"step": "blocked", "count": 8, "removed": 3},
        {"step": "downloaded", "count": 6},
        {"step": "embedded", "count": 6},
        {"step": "below the CLIP score", "count": 5, "removed": 1},
        {"step": "near-duplicates", "count": 3, "removed": 2},
        {"step": "kept", "count": 3},
        {"step": "indexed", "count": 3},
    ]
    assert report["complete"] is True
    assert BLOCKED_URLS[0] not in json.dumps(report) and hashlib.sha256(BLOCKED_URLS[0].encode()).hexdigest() not in json.dumps(report)


def test_a_classifier_is_a_step_of_the_funnel_when_set(run: RunLayout) -> None:
    run.curation_marker.mark_done({"input_fingerprint": "c2"}, curation_numbers(classifier=1, near_duplicates=1, classifier_name="tests.tiny:score", max_classifier_score=0.5))
    steps = [(f["step"], f["count"], f.get("removed")) for f in build_report(run, {}, {})["funnel"]][6:9]
    assert steps == [("below the CLIP score", 5, 1), ("classifier", 4, 1), ("near-duplicates", 3, 1)]


def test_samples_a_list_named_after_their_download_are_a_step_of_the_funnel(run: RunLayout) -> None:
    run.curation_marker.mark_done({"input_fingerprint": "c3"}, curation_numbers(blocked_after_download=1, near_duplicates=1))
    report = build_report(run, {}, {})
    steps = [(f["step"], f["count"], f.get("removed")) for f in report["funnel"]][6:9]
    assert steps == [("blocked since downloaded", 5, 1), ("below the CLIP score", 4, 1), ("near-duplicates", 3, 1)]
    assert report["curate"]["blocked_after_download"] == 1


def test_curation_that_did_not_run_or_finish_is_reported_so(run: RunLayout) -> None:
    """An earlier run's curation marker is not this run's when curate failed; a root never curated says so."""
    finished = {s: {"state": "success", "reason": None} for s in ("dedup", "download_images", "clip_embeddings")}
    outcomes = {**finished, "curate": {"state": "failed", "reason": "ValueError: x"}, "build_index": {"state": "upstream_failed", "reason": None}}
    report = build_report(run, {}, {}, outcomes)
    assert report["curate"]["state"] == "failed" and report["curate"]["kept"] is None and report["curate"]["near_duplicate_pairs"] == []
    assert report["curate"]["blocked_url"] == 2 and report["reason"] == "curate failed: ValueError: x"
    assert [f["step"] for f in report["funnel"]] == ["raw rows", "valid", "unique", "blocked", "downloaded", "embedded"]
    assert "Curation: failed." in render_html(report)

    run.curation_marker.clear()
    curate = build_report(run, {}, {})["curate"]
    assert curate["state"] == "not run" and curate["kept"] is None and curate["clip_score_histogram"] is None


def test_report_html_shows_the_histogram_with_its_threshold_and_the_pairs(run: RunLayout) -> None:
    page = Path(write_report(run, build_report(run, {}, {"run_id": "r1"}))["report_html"]).read_text()
    histogram = re.search(r'<svg id="clip-score-histogram".*?</svg>', page, re.S).group(0)
    assert histogram.count('class="bin"') == 20 and "min_clip_score 0.3" in histogram
    # 0.3 of -1..1 across the 700 px from x=40: the line stands at 40 + 700 * 0.65.
    assert '<line class="threshold" x1="495.0"' in histogram

    pairs = re.findall(r'<figure class="pair">(.*?)</figure>', page, re.S)
    assert len(pairs) == 2
    for pair, shown in zip(PAIRS, pairs):
        assert f'{pair["key"]} removed, a near-duplicate of {pair["duplicate_of"]} (kept); cosine {pair["cosine"]:.4f}' in shown
        images = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" alt="(\d+)">', shown)
        assert [key for _, key in images] == [pair["key"], pair["duplicate_of"]]
        for data, key in images:
            with Image.open(io.BytesIO(base64.b64decode(data))) as thumbnail:
                assert max(thumbnail.size) <= 96
                assert np.abs(np.asarray(thumbnail.convert("RGB"))[24, 48].astype(int) - COLORS[key]).max() <= 8  # its sample's colour
    assert "URLs never requested 2, images never written 1" in page and "blocked</span>" in page and "8 (3 removed)" in page


def test_a_pair_whose_sample_is_in_no_shard_is_named_without_a_thumbnail(run: RunLayout) -> None:
    report = build_report(run, {}, {})
    report["curate"]["near_duplicate_pairs"] = [{"key": "000990000001", "duplicate_of": "000000000001", "cosine": 0.99}]
    write_report(run, report)
    page = Path(run.report_html).read_text()
    assert '<span class="missing">000990000001: no image</span>' in page and 'alt="000000000001"' in page


def test_member_offsets_come_from_the_offset_table_or_the_tar(run: RunLayout) -> None:
    tar = run.current_shards()[0]
    from_tar = tar_member_offsets(run, tar)
    write_offsets(tar, run.offsets_table("part-00000", "0000000000"))
    assert tar_member_offsets(run, tar) == from_tar and len(from_tar) == 18
