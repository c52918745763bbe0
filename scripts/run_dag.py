"""Run ``laion_pipeline`` once in this process (``dag.test``) with a JSON conf.

    python scripts/run_dag.py CONF.json

Prints a line per stage and progress; the full logs (Airflow's, Spark's, img2dataset's)
go to data/logs/<date>-<time>.log, whose path is printed first and last. Exits 0 when the
run succeeded, 1 when it failed. Rerunning with the same conf continues the same dataset
under the same output_root: finished stages and shards are skipped.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from progress import Console, new_log_file, report_failure, run_logged, watching_stages

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "data" / "logs"


def migrate_db() -> None:
    """Create or upgrade the Airflow metadata database (its output goes where fd 1 and 2 go)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True)


def run_pipeline(conf: dict[str, Any], dag_id: str = "laion_pipeline") -> Any:
    """Trigger one run of ``dag_id`` with ``conf`` and return its DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id).test(run_conf=conf)


def run_watched(conf: dict[str, Any], console: Console, every: float) -> bool:
    """:func:`run_pipeline` with a line per stage and progress every ``every`` seconds; True on success."""
    with watching_stages(console, every) as listener:
        dag_run = run_pipeline(conf)
    if str(dag_run.state).endswith("success"):
        console.line(f"run {dag_run.run_id} succeeded")
        return True
    report_failure(console, listener, f"run {dag_run.run_id}")
    return False


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

    def run(console: Console) -> bool:
        logging.basicConfig(level=logging.INFO)
        migrate_db()
        return run_watched(conf, console, every=15)

    return run_logged("laion_pipeline", new_log_file(LOGS), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
