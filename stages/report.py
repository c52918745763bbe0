"""report: every stage's numbers in ``report/report.json`` and a readable ``report.html``.

A report is written for every run that got past dedup, whether the later stages finished
or not: it reads what is on storage and says which stages did not finish, and why. The
curation's part (what each filter removed, the clip_score histogram, near-duplicate pairs)
is in :mod:`stages.report_curate`.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from typing import Any, Mapping

from stages import storage
from stages.errors import NothingToDo
from stages.images.shards import summarize_shards
from stages.embeddings import gather_embeddings
from stages.layout import RunLayout
from stages.report_curate import NOT_RUN, blocked_step, curation_steps, pair_thumbnails, render_curation, summarize_curation

log = logging.getLogger(__name__)

STAGE_ORDER = ["fetch_metadata", "dedup", "download_images", "clip_embeddings", "curate", "build_index"]
SUCCESS = "success"  # Airflow's task state of a finished stage; the others are reported as they are
REASONS_SHOWN = 5  # failure reasons named in a one-line summary of the downloads


def downloads_line(downloads: Mapping[str, Any]) -> str:
    """The downloads in one line: ``0 of 48 downloaded: refused_private_address 48``."""
    reasons = sorted(downloads["errors"].items(), key=lambda kv: (-kv[1], kv[0]))
    line = f'{downloads["successes"]} of {downloads["count"]} downloaded'
    if not reasons:
        return line
    named = ", ".join(f"{reason} {n}" for reason, n in reasons[:REASONS_SHOWN])
    more = f" and {len(reasons) - REASONS_SHOWN} more reasons" if len(reasons) > REASONS_SHOWN else ""
    return f"{line}: {named}{more}"


def summarize_stages(
    stage_numbers: Mapping[str, list[dict[str, Any]]], outcomes: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Each stage's state, wall time and, when it did not finish, why.

    The wall time runs from the stage's first task's start to its last task's end (a mapped
    stage's tasks overlap, so their spans are merged, not summed); None when no task of the
    stage finished. Without ``outcomes`` every stage that reported numbers succeeded.
    """
    stages = []
    for name in STAGE_ORDER:
        runs = [n for n in stage_numbers.get(name, []) if n and "started_at" in n]
        outcome = (outcomes or {}).get(name)
        if not runs and outcome is None:
            continue
        duration = round(max(n["ended_at"] for n in runs) - min(n["started_at"] for n in runs), 3) if runs else None
        entry = {"name": name, "state": outcome["state"] if outcome else SUCCESS, "duration_s": duration, "tasks": len(runs)}
        if outcome and outcome.get("reason"):
            entry["reason"] = outcome["reason"]
        stages.append(entry)
    return stages


def unfinished_reason(stages: list[dict[str, Any]]) -> str | None:
    """Why the run is incomplete: its first stage that did not succeed, and that stage's reason."""
    for stage in stages:
        if stage["state"] != SUCCESS:
            reason = f'{stage["name"]} {stage["state"]}'
            return f'{reason}: {stage["reason"]}' if stage.get("reason") else reason
    return None


def build_report(
    layout: RunLayout,
    stage_numbers: Mapping[str, list[dict[str, Any]]],
    run: dict[str, Any],
    outcomes: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble report.json from the artifacts on storage (the truth) and the tasks' timings.

    ``outcomes`` say how each stage's tasks ended in this run (``{"state": ..., "reason":
    ...}`` by stage). A stage that did not succeed has no numbers in the report (its
    marker, perhaps an earlier run's, is not read) and the funnel stops before it. Without
    ``outcomes``, every stage must have finished, curation aside: an output root never
    curated is reported so (``curate.state`` "not run"). No report without dedup's parts.

    The funnel counts what is left after each step; a filter's step (``blocked``, ``below
    the CLIP score``, ``classifier``, ``near-duplicates``) also says how many it ``removed``.
    ``blocked`` comes before ``downloaded``: the blocklists act before and during downloads.
    """
    stages = summarize_stages(stage_numbers, outcomes)
    states = {s["name"]: s["state"] for s in stages}
    if states.get("dedup", SUCCESS) != SUCCESS:
        raise NothingToDo(f"no report for {layout.output_root}: {unfinished_reason(stages)}")
    dedup = layout.dedup_stats()
    parts = layout.current_parts(dedup)
    shards = summarize_shards(layout.images, parts)
    finished = {name: states.get(name, SUCCESS) == SUCCESS for name in STAGE_ORDER}
    # Each part's task marks its own embeddings: their totals, as build_index records them.
    tars_by_part = {part: layout.current_shards([part]) for part in parts}
    embeddings = gather_embeddings(layout, tars_by_part, write=False) if finished["clip_embeddings"] else None
    index = layout.index_marker.recorded() if finished["build_index"] else None
    # Curation is read when it and the embeddings it curates finished in this run.
    curate_ended = None if finished["curate"] and finished["clip_embeddings"] else states.get("curate", NOT_RUN)
    curate = summarize_curation(layout, parts, curate_ended)
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
        "summary": downloads_line(shards),
    }
    index_summary = {
        name: {
            **{k: index[name][k] for k in ("index_key", "ntotal", "size_bytes", "recall_at_10", "build_seconds")},
            **{k: index[name].get(k) for k in ("action", "added", "retrain_reason", "index_param", "rerank_k", "recall_at_10_without_rerank")},
        }
        for name in ("image", "text")
    } if index else {}  # fmt: skip
    funnel = [
        {"step": "raw rows", "count": dedup["rows_in"]},
        {"step": "valid", "count": dedup["rows_in"] - dedup["rows_invalid"]},
        {"step": "unique", "count": dedup["rows_out"]},
        *blocked_step(curate, dedup["rows_out"]),
        {"step": "downloaded", "count": shards["successes"]},
    ]
    if embeddings is not None:
        funnel.append({"step": "embedded", "count": embeddings["count"]})
        funnel.extend(curation_steps(curate))
    if index is not None:
        funnel.append({"step": "indexed", "count": index["image"]["ntotal"]})
    # What the report says of the data and of how its stages ended: a rerun that changed
    # none of it leaves the report as is.
    ended = {s["name"]: [s["state"], s.get("reason")] for s in stages if s["state"] != SUCCESS}
    inputs = json.dumps([dedup, shards, embeddings, curate, index, ended], sort_keys=True, default=str)
    return {
        "inputs_fingerprint": hashlib.sha256(inputs.encode()).hexdigest(),
        "run": run,
        "complete": all(finished.values()),
        "reason": unfinished_reason(stages),
        "stages": stages,
        "dedup": {
            **{k: dedup[k] for k in ("rows_in", "rows_invalid", "rows_out", "partitions")},
            "batches": len(dedup.get("batches", [])),
            "duplicates_of_earlier_batches": dedup.get("duplicates_of_earlier_batches", 0),
            "rows_invalid_by_reason": dedup.get("rows_invalid_by_reason", {}),
            "captions_truncated": dedup.get("captions_truncated", 0),
            "files_rejected": dedup.get("files_rejected", []),
        },
        "download": download,
        "latest_batch": latest_batch(layout, dedup, index_summary),
        "embeddings": {k: (embeddings or {}).get(k) for k in ("count", "dim", "device", "clip_model", "samples_per_second")},
        "curate": curate,
        "index": index_summary,
        "funnel": funnel,
    }


def latest_batch(layout: RunLayout, dedup: Mapping[str, Any], index: Mapping[str, Any]) -> dict[str, Any] | None:
    """The latest batch's own numbers: its rows, new unique pairs, duplicates of earlier
    batches, downloads, and what the index did with it."""
    if not dedup.get("batches"):
        return None
    batch = dedup["batches"][-1]
    shards = summarize_shards(layout.images, [p.split(".")[0] for p in batch["parts"]])
    image = index.get("image", {})
    return {
        **{k: batch.get(k) for k in ("batch", "files", "rows_in", "rows_invalid", "duplicates_of_earlier_batches", "rows_out")},
        "parts": len(batch["parts"]),
        "downloaded": shards["successes"],
        "download_count": shards["count"],
        "new_vectors": image.get("added"),
        "index_action": image.get("action"),
        "recall_at_10": image.get("recall_at_10"),
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


def stage_shown(stage: Mapping[str, Any]) -> str:
    """A stage's duration, or how it ended when it did not finish."""
    state = stage.get("state", SUCCESS)
    if state != SUCCESS or stage["duration_s"] is None:
        return f'{state}: {stage["reason"]}' if stage.get("reason") else str(state)
    return f'{stage["duration_s"]:.1f} s'


def batch_line(report: Mapping[str, Any]) -> str:
    """The dataset's size and the latest batch's numbers, in one escaped sentence."""
    dedup, batch = report["dedup"], report.get("latest_batch")
    if "rows_out" not in dedup:
        return ""
    line = f'{dedup["rows_out"]:,} unique pairs in {dedup.get("batches", 1)} batches.'
    if batch:
        line += (
            f' Batch {batch["batch"]}: {batch["rows_in"]:,} rows, {batch["rows_out"]:,} new unique pairs, '
            f'{batch["duplicates_of_earlier_batches"]:,} already in earlier batches, {batch["downloaded"]:,} of '
            f'{batch["download_count"]:,} downloaded; index {batch["index_action"] or "not built"}'
        )
        if batch.get("new_vectors") is not None:
            line += f' ({batch["new_vectors"]:,} vectors added, recall@10 {batch["recall_at_10"]})'
        line += "."
    return html.escape(line)


def step_shown(step: Mapping[str, Any]) -> str:
    """A funnel step's count, and what it removed when it is a filter: ``7 (2 removed)``."""
    return f'{step["count"]:,} ({step["removed"]:,} removed)' if "removed" in step else f'{step["count"]:,}'


def render_html(report: dict[str, Any], thumbnails: Mapping[str, str] | None = None) -> str:
    """A self-contained page: how the run ended, stage durations and the funnel as bar
    charts, then tables and the curation; ``thumbnails`` (key -> data: URI) show the
    removed near-duplicate pairs."""
    stages = _bars([(s["name"], s["duration_s"] or 0, stage_shown(s)) for s in report["stages"]], "#3b82f6")
    funnel = _bars([(f["step"], f["count"], step_shown(f)) for f in report["funnel"]], "#10b981")
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
    ended = "" if report.get("complete", True) else (
        f'<p class="incomplete">The run did not finish: {html.escape(str(report.get("reason")))}</p>'
    )
    embeddings = report["embeddings"]
    embedded = (
        f'{embeddings["count"]:,} vectors of dimension {embeddings["dim"]} '
        f'({html.escape(str(embeddings["clip_model"]))} on {html.escape(str(embeddings["device"]))})'
        if embeddings.get("count") is not None else "none: clip_embeddings did not finish"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>laion_pipeline report {run}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#111}}
.row{{display:flex;align-items:center;margin:.2em 0}}
.label{{width:12em}} .bar{{display:inline-block;height:1.1em;border-radius:3px}} .value{{margin-left:.5em}}
.incomplete{{border-left:4px solid #ef4444;padding:.3em .8em;background:#fef2f2}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ddd;padding:.25em .6em;text-align:left}}
#near-duplicate-pairs{{display:flex;flex-wrap:wrap;gap:1em}} .pair{{margin:0;width:14em}} .pair img{{margin-right:.3em}}
.pair figcaption{{font-size:.8em;overflow-wrap:anywhere}}
</style></head><body>
<h1>laion_pipeline run {run}</h1>
{ended}
<h2>Stage durations</h2>
{stages}
<h2>Samples through the pipeline</h2>
{funnel}
<h2>Dataset and latest batch</h2>
<p>{batch_line(report)}</p>
<h2>Rejected metadata rows</h2>
<table><tr><th>reason</th><th>rows</th></tr>{rejected}</table>
<h2>Downloads</h2>
<p>{html.escape(report["download"].get("summary", ""))}; success rate {report["download"]["success_rate"]},
{report["download"]["bytes"]:,} bytes of tars</p>
<table><tr><th>failure reason</th><th>samples</th></tr>{errors}</table>
<table><tr><th>shard</th><th>successes</th><th>bytes</th></tr>{shards}</table>
<h2>Embeddings</h2>
<p>{embedded}</p>
{render_curation(report.get("curate"), thumbnails or {})}
<h2>Indexes</h2>
<table><tr><th>index</th><th>key</th><th>vectors</th><th>bytes</th><th>recall@10</th></tr>{index}</table>
</body></html>
"""


def write_report(layout: RunLayout, report: dict[str, Any]) -> dict[str, Any]:
    """Write report.html, then report.json (last: its presence marks a whole report).

    Skipped when report.json was made from the same artifacts: it keeps describing the run
    that made them, byte for byte.
    """
    json_url, html_url = layout.report_json, layout.report_html
    previous = storage.read_json_or_none(json_url)
    if previous is not None and previous.get("inputs_fingerprint") == report["inputs_fingerprint"]:
        log.info("Skipping report: %s (run %s) describes the same artifacts", json_url, previous["run"].get("run_id"))
        return {"report_json": json_url, "report_html": html_url, "skipped": True}
    storage.write_text(html_url, render_html(report, pair_thumbnails(layout, report.get("curate"))))
    storage.write_json(json_url, report)
    return {"report_json": json_url, "report_html": html_url}
