"""What the benchmarks run in a fresh process, as the pipeline or a user would; each prints one JSON line.

    python -m bench.workers download-stage PART.parquet OUT SETTINGS_JSON
    python -m bench.workers duckdb-dedup RAW_DIR OUT PARTITIONS
    python -m bench.workers embed-stage OUT CLIP_MODEL BATCH TAR...
    python -m bench.workers embed-bare CLIP_MODEL BATCH TAR...
    python -m bench.workers parse-dag DAG_FILE
    python -m bench.workers run-dag DAG_FOLDER DAG_ID CONF_JSON
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def download_stage(part: str, out: str, settings_json: str) -> dict[str, Any]:
    """stages.images.download.download_part as the DAG's task calls it, loopback opened as the demo does."""
    from stages.images.download import DownloadSettings, download_part
    from stages.settings import settings_from

    settings = settings_from(DownloadSettings, {**json.loads(settings_json), "allowed_networks": ["127.0.0.0/8"], "max_requests_per_second_per_host": 0})
    numbers = download_part(part, out, settings, dedup_version="bench")
    return {"stage_seconds": numbers["seconds"], "stage_successes": numbers["successes"],
            "start_method": settings.start_method}


def parse_dag(dag_file: str) -> dict[str, Any]:
    """Seconds to parse the DAG file, Airflow itself already imported (as in the DAG processor)."""
    import airflow  # noqa: F401
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag(dag_folder=dag_file)
    seconds = time.perf_counter() - started
    if bag.import_errors or not bag.dags:
        raise RuntimeError(f"DAG did not parse: {bag.import_errors}")
    heavy = sorted(m for m in ("torch", "pyspark", "faiss", "img2dataset", "clip_retrieval", "autofaiss") if m in sys.modules)
    return {"seconds": round(seconds, 4), "heavy_modules_imported": heavy}


def main(argv: list[str]) -> int:
    # Each command imports only what it runs: a worker's start-up is part of what is measured.
    commands = {
        "download-stage": lambda *a: download_stage(*a),
        "duckdb-dedup": lambda raw, out, parts: _load("dedup").duckdb_dedup(raw, out, int(parts)),
        "embed-stage": lambda out, model, batch, *tars: _load("embeddings").stage(out, model, int(batch), list(tars)),
        "embed-bare": lambda model, batch, *tars: _load("embeddings").bare_loop(model, int(batch), list(tars)),
        "parse-dag": lambda dag_file: parse_dag(dag_file),
        "run-dag": lambda folder, dag_id, conf: _load("orchestration").run_dag(folder, dag_id, json.loads(conf)),
    }
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    result = commands[argv[1]](*argv[2:])
    print(json.dumps(result, default=str))
    return 0


def _load(name: str) -> Any:
    import importlib

    return importlib.import_module(f"bench.{name}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
