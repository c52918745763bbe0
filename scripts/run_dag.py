"""Run ``laion_pipeline`` once in this process (``dag.test``) with a JSON conf.

    python scripts/run_dag.py CONF.json

Exits 0 when the run succeeded, 1 when it failed. Rerunning with the same conf continues
the same dataset under the same output_root: finished stages and shards are skipped.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_pipeline(conf: dict[str, Any], dag_id: str = "laion_pipeline") -> Any:
    """Trigger one run of ``dag_id`` with ``conf`` and return its DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id).test(run_conf=conf)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    conf_path = Path(argv[1])
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"cannot read run conf {conf_path}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    dag_run = run_pipeline(conf)
    state = str(getattr(dag_run, "state", "failed"))
    print(f"laion_pipeline run {dag_run.run_id}: {state}")
    return 0 if state.endswith("success") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
