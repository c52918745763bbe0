"""report: every stage's numbers in ``report/report.json`` and a readable ``report.html``."""

from __future__ import annotations

import hashlib
import html
import json
import logging
from typing import Any

from stages import storage
from stages.images.shards import summarize_shards
from stages.layout import RunLayout

log = logging.getLogger(__name__)

STAGE_ORDER = ["fetch_metadata", "dedup", "download_images", "clip_embeddings", "build_index"]


def stage_durations(stage_numbers: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Wall time of each stage: from its first task's start to its last task's end.

    A mapped stage's tasks overlap, so their spans are merged, not summed.
    """
    stages = []
    for name in STAGE_ORDER:
        runs = [n for n in stage_numbers.get(name, []) if n and "started_at" in n]
        if not runs:
            continue
        start = min(n["started_at"] for n in runs)
        end = max(n["ended_at"] for n in runs)
        stages.append({"name": name, "duration_s": round(end - start, 3), "tasks": len(runs)})
    return stages


def build_report(layout: RunLayout, stage_numbers: dict[str, list[dict[str, Any]]], run: dict[str, Any]) -> dict[str, Any]:
    """Assemble report.json from the artifacts on storage (the truth) and the tasks' timings."""
    dedup = layout.dedup_stats()
    shards = summarize_shards(layout.images, layout.current_parts(dedup))
    embeddings = layout.embeddings_marker.recorded()
    index = layout.index_marker.recorded()
    count = shards["count"]
    download = {
        "count": count,
        "successes": shards["successes"],
        "failed_to_download": shards["failed_to_download"],
        "failed_to_resize": shards["failed_to_resize"],
        "success_rate": round(shards["successes"] / count, 4) if count else None,
        "errors": dict(sorted(shards["errors"].items(), key=lambda kv: -kv[1])),
        "bytes": shards["bytes"],
        "shards": shards["shards"],
    }
    index_summary = {
        name: {k: index[name][k] for k in ("index_key", "ntotal", "size_bytes", "recall_at_10", "build_seconds")}
        for name in ("image", "text")
    }
    # What the report says of the data: a rerun that changed none of it leaves the report as is.
    inputs = json.dumps([dedup, shards, embeddings, index], sort_keys=True, default=str)
    return {
        "inputs_fingerprint": hashlib.sha256(inputs.encode()).hexdigest(),
        "run": run,
        "stages": stage_durations(stage_numbers),
        "dedup": {
            **{k: dedup[k] for k in ("rows_in", "rows_invalid", "rows_out", "partitions")},
            "rows_invalid_by_reason": dedup.get("rows_invalid_by_reason", {}),
            "captions_truncated": dedup.get("captions_truncated", 0),
            "files_rejected": dedup.get("files_rejected", []),
        },
        "download": download,
        "embeddings": {k: embeddings.get(k) for k in ("count", "dim", "device", "clip_model", "samples_per_second")},
        "index": index_summary,
        "funnel": [
            {"step": "raw rows", "count": dedup["rows_in"]},
            {"step": "valid", "count": dedup["rows_in"] - dedup["rows_invalid"]},
            {"step": "unique", "count": dedup["rows_out"]},
            {"step": "downloaded", "count": shards["successes"]},
            {"step": "embedded", "count": embeddings["count"]},
            {"step": "indexed", "count": index["image"]["ntotal"]},
        ],
    }


def _bars(rows: list[tuple[str, float, str]], color: str) -> str:
    top = max((v for _, v, _ in rows), default=0) or 1
    out = []
    for label, value, shown in rows:
        width = max(1.0, 100.0 * value / top)
        out.append(
            f'<div class="row"><span class="label">{html.escape(label)}</span>'
            f'<span class="bar" style="width:{width:.1f}%;background:{color}"></span>'
            f'<span class="value">{html.escape(shown)}</span></div>'
        )
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: stage durations and the funnel as bar charts, then tables."""
    stages = _bars([(s["name"], s["duration_s"], f'{s["duration_s"]:.1f} s') for s in report["stages"]], "#3b82f6")
    funnel = _bars([(f["step"], f["count"], f'{f["count"]:,}') for f in report["funnel"]], "#10b981")
    errors = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in report["download"]["errors"].items()
    ) or "<tr><td colspan=2>none</td></tr>"
    shards = "".join(
        f'<tr><td>{html.escape(s["shard"])}</td><td>{s["successes"]}/{s["count"]}</td><td>{s["bytes"]:,}</td></tr>'
        for s in report["download"]["shards"]
    )
    index = "".join(
        f'<tr><td>{name}</td><td>{html.escape(str(i["index_key"]))}</td><td>{i["ntotal"]:,}</td>'
        f'<td>{i["size_bytes"]:,}</td><td>{i["recall_at_10"]}</td></tr>'
        for name, i in report["index"].items()
    )
    rejected = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in report["dedup"].get("rows_invalid_by_reason", {}).items()
    ) or "<tr><td colspan=2>none</td></tr>"
    run = html.escape(str(report["run"].get("run_id", "")))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>laion_pipeline report {run}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#111}}
.row{{display:flex;align-items:center;margin:.2em 0}}
.label{{width:12em}} .bar{{display:inline-block;height:1.1em;border-radius:3px}} .value{{margin-left:.5em}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ddd;padding:.25em .6em;text-align:left}}
</style></head><body>
<h1>laion_pipeline run {run}</h1>
<h2>Stage durations</h2>
{stages}
<h2>Samples through the pipeline</h2>
{funnel}
<h2>Rejected metadata rows</h2>
<table><tr><th>reason</th><th>rows</th></tr>{rejected}</table>
<h2>Downloads</h2>
<p>success rate {report["download"]["success_rate"]}, {report["download"]["bytes"]:,} bytes of tars</p>
<table><tr><th>failure reason</th><th>samples</th></tr>{errors}</table>
<table><tr><th>shard</th><th>successes</th><th>bytes</th></tr>{shards}</table>
<h2>Embeddings</h2>
<p>{report["embeddings"]["count"]:,} vectors of dimension {report["embeddings"]["dim"]}
({html.escape(str(report["embeddings"]["clip_model"]))} on {report["embeddings"]["device"]})</p>
<h2>Indexes</h2>
<table><tr><th>index</th><th>key</th><th>vectors</th><th>bytes</th><th>recall@10</th></tr>{index}</table>
</body></html>
"""


def write_report(layout: RunLayout, report: dict[str, Any]) -> dict[str, Any]:
    """Write report.html, then report.json (last: its presence marks a complete report).

    Skipped when report.json was made from the same artifacts: it keeps describing the run
    that made them, byte for byte.
    """
    json_url, html_url = layout.report_json, layout.report_html
    previous = storage.read_json_or_none(json_url)
    if previous is not None and previous.get("inputs_fingerprint") == report["inputs_fingerprint"]:
        log.info("Skipping report: %s (run %s) describes the same artifacts", json_url, previous["run"].get("run_id"))
        return {"report_json": json_url, "report_html": html_url, "skipped": True}
    storage.write_text(html_url, render_html(report))
    storage.write_json(json_url, report)
    return {"report_json": json_url, "report_html": html_url}
