"""A run's report.json as a page: charts drawn as inline SVG, so the page needs no script or CDN."""

from __future__ import annotations

from html import escape
from typing import Any, Callable
from urllib.parse import quote

from stages.report import stage_shown
from stages.report_curate import render_curation

BLUE, GREEN, RED, GREY = "#3b82f6", "#10b981", "#ef4444", "#e5e7eb"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def bar_chart(rows: list[tuple[str, float, str]], *, color: str, chart_id: str, label_width: int = 190, scale: float | None = None) -> str:
    """Horizontal bars: (label, value, value as shown) per row, scaled to the largest value or ``scale``."""
    width, bar_area, row_h = 760, 440, 26
    top = scale or max((v for _, v, _ in rows), default=0) or 1
    parts = []
    for i, (label, value, shown) in enumerate(rows):
        y = i * row_h
        w = max(1.0, bar_area * value / top)
        parts.append(
            f'<text x="{label_width - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_width}" y="{y + 4}" width="{bar_area}" height="18" rx="3" fill="{GREY}"/>'
            f'<rect class="bar" x="{label_width}" y="{y + 4}" width="{w:.1f}" height="18" rx="3" fill="{color}">'
            f"<title>{escape(label)}: {escape(shown)}</title></rect>"
            f'<text x="{label_width + bar_area + 8}" y="{y + 17}">{escape(shown)}</text>'
        )
    height = max(row_h, row_h * len(rows))
    return (
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{chart_id}">{"".join(parts)}</svg>'
    )


def funnel_chart(funnel: list[dict[str, Any]]) -> str:
    """Centered bars, each step's share of the raw rows and of the step before."""
    width, row_h = 860, 34
    top = max((f["count"] for f in funnel), default=0) or 1
    parts = []
    for i, step in enumerate(funnel):
        w = max(2.0, 420 * step["count"] / top)
        x = 170 + (420 - w) / 2
        before = funnel[i - 1]["count"] if i else step["count"]
        share = f' ({100 * step["count"] / before:.1f}% of {funnel[i - 1]["step"]})' if i and before else ""
        parts.append(
            f'<text x="160" y="{i * row_h + 22}" text-anchor="end">{escape(step["step"])}</text>'
            f'<rect class="bar" x="{x:.1f}" y="{i * row_h + 4}" width="{w:.1f}" height="26" rx="3" fill="{GREEN}"/>'
            f'<text x="600" y="{i * row_h + 22}">{step["count"]:,}{escape(share)}</text>'
        )
    height = row_h * max(1, len(funnel))
    return f'<svg id="funnel" class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="funnel">{"".join(parts)}</svg>'


def shard_chart(shards: list[dict[str, Any]]) -> str:
    """Per shard: downloaded share in green, failed share in red."""
    width, row_h, x0, bar = 760, 24, 190, 440
    parts = []
    for i, s in enumerate(shards):
        rate = s["successes"] / s["count"] if s["count"] else 0.0
        y = i * row_h
        parts.append(
            f'<text x="{x0 - 8}" y="{y + 16}" text-anchor="end">{escape(s["shard"])}</text>'
            f'<rect x="{x0}" y="{y + 3}" width="{bar}" height="18" fill="{RED}"/>'
            f'<rect class="bar" x="{x0}" y="{y + 3}" width="{bar * rate:.1f}" height="18" fill="{GREEN}">'
            f'<title>{escape(s["shard"])}: {s["successes"]} of {s["count"]}</title></rect>'
            f'<text x="{x0 + bar + 8}" y="{y + 16}">{100 * rate:.1f}% ({s["successes"]}/{s["count"]})</text>'
        )
    height = row_h * max(1, len(shards))
    return f'<svg id="shards" class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="success rate per shard">{"".join(parts)}</svg>'


def _table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_report(
    report: dict[str, Any],
    *,
    run_id: str,
    samples: list[dict[str, str]],
    image_url: Callable[[str], str],
    airflow_run_href: str | None,
    search_href: str,
) -> str:
    """The page for one run. ``report`` is report.json; ``samples`` (key, caption, url) fill the grid."""
    download, embeddings = report["download"], report["embeddings"]
    reported_run = str(report.get("run", {}).get("run_id", run_id))
    stages = bar_chart([(s["name"], s["duration_s"] or 0, stage_shown(s)) for s in report["stages"]], color=BLUE, chart_id="stage-durations")
    errors = bar_chart([(k, v, f"{v:,}") for k, v in download["errors"].items()], color=RED, chart_id="failure-reasons", label_width=260)
    recall = bar_chart(
        [(name, i["recall_at_10"], f'{i["recall_at_10"]:.3f}') for name, i in report["index"].items()],
        color=BLUE, chart_id="recall", scale=1.0,
    )
    index_rows = [
        [name, str(i["index_key"]), f'{i["ntotal"]:,}', f'{i["size_bytes"]:,} ({human_bytes(i["size_bytes"])})', f'{i["recall_at_10"]}']
        for name, i in report["index"].items()
    ]
    grid = "".join(
        f'<figure class="sample"><img src="{escape(image_url(s["key"]))}" alt="{escape(s["caption"])}" loading="lazy">'
        f'<figcaption>{escape(s["caption"])}<br><a href="{escape(s["url"])}" rel="noopener noreferrer">{escape(s["key"])}</a></figcaption></figure>'
        for s in samples
    )
    # The pairs' images come from the search API by key (removed samples stay in their tars).
    curate = report.get("curate")
    pair_keys = {k for p in (curate or {}).get("near_duplicate_pairs", []) for k in (p["key"], p["duplicate_of"])}
    curation = render_curation(curate, {k: image_url(k) for k in pair_keys})
    last = report["funnel"][-1]
    # A run that did not finish still has its report (stages/report.py): say so first.
    ended = "" if report.get("complete", True) else (
        f'<p id="incomplete" class="error">The run did not finish: {escape(str(report.get("reason")))}</p>'
    )
    note = "" if reported_run == run_id else (
        f'<p class="note">Run {escape(run_id)} wrote the same dataset as run {escape(reported_run)}, which rebuilt it last: this is that report.</p>'
    )
    back = (
        f'<a id="airflow-run" class="top-link" href="{escape(airflow_run_href)}" target="_top">Open run {escape(reported_run)} in Airflow</a>'
        if airflow_run_href else f'<span class="note">Run {escape(reported_run)} is recorded in another Airflow.</span>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Report of {escape(reported_run)}</title>
<link rel="stylesheet" href="static/laion.css"></head><body>
<header><h1>laion_pipeline run <span id="run-id">{escape(reported_run)}</span></h1>
<nav>{back} · <a href="{escape(search_href)}">Search this run</a> · <a href="reports">All reports</a></nav></header>
{ended}{note}
<p class="lead">{report["funnel"][0]["count"]:,} raw rows became <b>{last["count"]:,}</b> {escape(last["step"])} images
(download success rate <b id="success-rate">{100 * (download["success_rate"] or 0):.2f}%</b>),
{escape(report["run"].get("output_root", ""))}.</p>
<section><h2>Stage durations</h2>{stages}</section>
<section><h2>Samples through the pipeline</h2>{funnel_chart(report["funnel"])}</section>
<section><h2>Downloads per shard</h2>{shard_chart(download["shards"])}
<p>{download["successes"]:,} of {download["count"]:,} downloaded, {download["failed_to_download"]:,} failed to download,
{download["failed_to_resize"]:,} failed to resize; {download["bytes"]:,} bytes of tars.</p>
<h3>Failure reasons</h3>{errors if download["errors"] else "<p>none</p>"}</section>
<section><h2>Samples</h2><div id="sample-grid" class="grid">{grid}</div></section>
<section id="curation">{curation}</section>
<section><h2>Embeddings and indexes</h2>
<p>{(embeddings.get("count") or 0):,} vectors of dimension {embeddings.get("dim")} from {escape(str(embeddings.get("clip_model")))}
on {escape(str(embeddings.get("device")))} ({embeddings.get("samples_per_second")} samples/s).</p>
{_table(["index", "key", "vectors", "bytes", "recall@10"], index_rows, "index-table")}
<h3>recall@10</h3>{recall}</section>
<script src="static/top-link.js"></script>
</body></html>
"""


def render_run_list(runs: list[dict[str, Any]]) -> str:
    items = "".join(
        f'<li><a class="run-report" href="report?run={quote(r["run_id"], safe="")}">{escape(r["run_id"])}</a>'
        f' <span class="muted">{escape(r["output_root"])} · {r.get("vectors") or "?"} images · {escape(r["source"])}</span>'
        f' · <a href="search?run={quote(r["run_id"], safe="")}">search</a></li>'
        for r in runs
    ) or "<li>No finished laion_pipeline run has an index yet.</li>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>laion_pipeline reports</title>
<link rel="stylesheet" href="static/laion.css"></head><body>
<header><h1>laion_pipeline run reports</h1><nav><a href="search">Search</a></nav></header>
<ul id="runs">{items}</ul></body></html>
"""


def render_message(title: str, message: str, status: int) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<link rel="stylesheet" href="static/laion.css"></head><body>
<header><h1>{escape(title)}</h1><nav><a href="reports">All reports</a> · <a href="search">Search</a></nav></header>
<p class="error" data-status="{status}">{escape(message)}</p></body></html>
"""
