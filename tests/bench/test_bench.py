"""The benchmark harness at its tiny size: it runs and writes a well-formed results file.

Nothing here asserts on timings: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import REPO

# The end-to-end case runs the whole DAG and the hand-run script (minutes even when tiny):
# `make bench` covers it.
CHEAP = ("download", "dedup", "embeddings", "index", "orchestration")


@pytest.mark.timeout(900)  # the harness's own subprocess limit is 600 s
def test_tiny_bench_writes_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--only", ",".join(CHEAP),
         "--results", str(results), "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [path] = results.glob("*-tiny.json")
    record = json.loads(path.read_text())
    assert record["size"] == "tiny" and record["machine"]["cpu_count"] >= 1
    assert len(record["machine"]["loadavg_start"]) == 3
    assert sorted(record["benchmarks"]) == sorted(CHEAP)
    for name, bench in record["benchmarks"].items():
        assert bench["commands"] and bench["repetitions"] and bench["median"], name
        for target in bench["targets"]:
            assert set(target) == {"name", "value", "op", "limit", "met"}, name
    download = record["benchmarks"]["download"]["median"]
    assert download["stage"]["successes"] == download["bare"]["successes"] == 48
    dedup = record["benchmarks"]["dedup"]["median"]
    assert dedup["spark_20000"]["rows_out"] == dedup["duckdb_20000"]["rows_out"] > 0
    index = record["benchmarks"]["index"]["median"]["5000"]
    for case, numbers in index["cases"].items():  # served through the search service, metadata rows included
        assert numbers["recall_at_10"] >= 0.9 and numbers["service"]["service_anon_mib"] < 1024, case
    assert "| target | measured | met |" in done.stdout
