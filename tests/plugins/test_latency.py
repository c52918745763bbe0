"""Query latency of the search API over the demo's index: 200 text queries, p50/p95 printed.

No timing is asserted (the machine is shared); the numbers are the API's own metrics
(/laion/api/metrics) and what the client measured, written to test-output/latency.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

REPO = Path(__file__).resolve().parents[2]
QUERIES = 200


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[max(0, -(-len(ordered) * p // 100) - 1)], 2)


def test_print_p50_p95_of_200_queries(
    airflow_client: object, login: object, search_run: dict, tar_samples: dict, capsys: pytest.CaptureFixture
) -> None:
    from laion_search.api import service
    from laion_search.service import LatencyWindow

    headers = login(airflow_client, "viewer")
    captions = [json.loads(s["json"])["caption"][:200] for _, s in sorted(tar_samples.items())]
    params = {"run": search_run["run_id"], "k": 10}
    assert airflow_client.get("/laion/api/search", params={**params, "text": "warm up"}, headers=headers).status_code == 200
    service.latency = LatencyWindow()  # a fresh window: only the measured queries
    client_ms = []
    for i in range(QUERIES):
        started = time.perf_counter()
        response = airflow_client.get("/laion/api/search", params={**params, "text": captions[i % len(captions)]}, headers=headers)
        client_ms.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    api = airflow_client.get("/laion/api/metrics", headers=headers).json()["search"]
    result = {
        "queries": QUERIES,
        "index_vectors": search_run["expected"]["successes"],
        "api_p50_ms": api["p50_ms"],
        "api_p95_ms": api["p95_ms"],
        "client_p50_ms": percentile(client_ms, 50),
        "client_p95_ms": percentile(client_ms, 95),
    }
    assert api["queries"] == QUERIES
    (REPO / "test-output").mkdir(exist_ok=True)
    (REPO / "test-output" / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    with capsys.disabled():  # shown in every run, not only with -s
        print(
            f"\n{QUERIES} text queries, k=10, {result['index_vectors']} vectors: "
            f"API p50 {result['api_p50_ms']} ms, p95 {result['api_p95_ms']} ms; "
            f"client (in-process HTTP) p50 {result['client_p50_ms']} ms, p95 {result['client_p95_ms']} ms"
        )
