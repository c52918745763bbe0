"""Prepare this machine's Airflow for laion_pipeline: database, pools, connections, and no
run left behind by a dead ``make run``.

Pools: `gpu` (LAION_GPU_SLOTS, default 1: one per GPU) for CLIP inference and index
building, `download` (LAION_DOWNLOAD_SLOTS, default 4) for img2dataset tasks. The Spark and
storage connections come from AIRFLOW_CONN_* environment variables (see the README).
A run that ``make run`` left running when its process died (SIGKILL, a reboot) is marked
failed (``run_dag.fail_stale_runs``), so that it does not hold the DAG's one active run.
"""

from __future__ import annotations

import os
import subprocess
import sys

from run_dag import fail_stale_runs


def airflow(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "airflow", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    airflow("db", "migrate")
    pools = {
        os.environ.get("LAION_GPU_POOL", "gpu"): (os.environ.get("LAION_GPU_SLOTS", "1"), "CLIP inference and index building: one slot per GPU"),
        os.environ.get("LAION_DOWNLOAD_POOL", "download"): (os.environ.get("LAION_DOWNLOAD_SLOTS", "4"), "img2dataset tasks running at once"),
    }
    for name, (slots, description) in pools.items():
        airflow("pools", "set", name, slots, description)
        print(f"pool {name}: {slots} slots")
    for line in fail_stale_runs():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
