"""A results file as the markdown table docs/benchmarks.md shows: `python -m bench.table RESULTS.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def key_numbers(name: str, bench: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, measured) rows for one benchmark's medians."""
    m = bench["median"]
    rows: list[tuple[str, str]] = []
    if name == "download":
        for case in (c for c in ("stage", "bare", "limit", "stage_spawn", "stage_forked") if c in m):
            rows.append((f"{case}: samples/s (per core)", f'{_fmt(m[case]["samples_per_s"])} ({_fmt(m[case]["samples_per_s_per_core"])})'))
    elif name == "dedup":
        for case, v in m.items():
            rows.append((f"{case.replace('_', ' ')} rows: s (rows/s)", f'{_fmt(v["seconds"])} ({v["rows_per_s"]:,})'))
    elif name == "embeddings":
        for case in ("stage", "bare"):
            rows.append((f"{case}: samples/s (s)", f'{_fmt(m[case]["samples_per_s"])} ({_fmt(m[case]["seconds"])})'))
    elif name == "index":
        for n, v in m.items():
            rows.append((f"{int(n):,} vectors: key", v["index_key"]))
            rows.append((f"{int(n):,} vectors: build s / peak MiB / size MiB",
                         f'{_fmt(v["build_seconds"])} / {_fmt(v["peak_rss_mib"])} / {_fmt(v["size_bytes"] / 2**20)}'))
            rows.append((f"{int(n):,} vectors: recall@10, p50 / p99 ms (flat p50)",
                         f'{v["recall_at_10"]}, {_fmt(v["p50_ms"])} / {_fmt(v["p99_ms"])} ({_fmt(v["flat_p50_ms"])})'))
    elif name == "orchestration":
        rows.append(("DAG parse s", _fmt(m["parse"]["seconds"])))
        for case, v in m.items():
            if case.startswith("mapped_"):
                rows.append((f"{case[7:]} empty mapped tasks: s (s/task)", f'{_fmt(v["seconds"])} ({_fmt(v["seconds_per_mapped_task"])})'))
    elif name == "end_to_end":
        rows.append(("DAG s / script s", f'{_fmt(m["dag"]["seconds"])} / {_fmt(m["script"]["seconds"])}'))
        if "dag_rerun" in m:  # results from before the rerun was measured lack it
            rows.append(("DAG rerun with nothing left to do s", _fmt(m["dag_rerun"]["seconds"])))
        rows.append(("DAG wall outside tasks s / outside stage compute s",
                     f'{_fmt(m["dag"]["outside_tasks_seconds"])} / {_fmt(m["dag"]["outside_own_compute_seconds"])}'))
    elif name == "growth":
        grow, rebuild = m["grow"], m["rebuild"]
        rows.append(("grow s / rebuild s", f'{_fmt(grow["seconds"])} / {_fmt(rebuild["seconds"])}'))
        rows.append(("grow / rebuild: images downloaded", f'{grow["downloaded"]:,} / {rebuild["downloaded"]:,}'))
        rows.append(("grow / rebuild: vectors added (index action)",
                     f'{grow["vectors_added"]:,} ({grow["index_action"]}) / {rebuild["vectors_added"]:,} ({rebuild["index_action"]})'))
        rows.append(("grow / rebuild: recall@10", f'{grow["recall_at_10"]} / {rebuild["recall_at_10"]}'))
    rows += [(f"ratio {k}", _fmt(v)) for k, v in bench["ratios"].items()]
    return rows


def markdown_table(record: dict[str, Any]) -> str:
    machine = record["machine"]
    lines = [
        f'`{record["command"]}` on {machine["cpu_count"]} × {machine["cpu_model"]}, {machine["memory_mib"]:,} MiB; '
        f'load average {", ".join(f"{x:.2f}" for x in machine["loadavg_start"])} at start, '
        f'{", ".join(f"{x:.2f}" for x in machine.get("loadavg_end", ()))} at end',
        "",
        "| benchmark | measured (median) | value |",
        "|---|---|---|",
    ]
    for name, bench in record["benchmarks"].items():
        lines += [f"| {name} | {what} | {value} |" for what, value in key_numbers(name, bench)]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for bench in record["benchmarks"].values():
        for t in bench["targets"]:
            lines.append(f'| {t["name"]} {t["op"]} {t["limit"]} | {_fmt(t["value"])} | {"yes" if t["met"] else "**no**"} |')
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
