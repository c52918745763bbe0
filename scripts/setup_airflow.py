"""Prepare this machine's Airflow for laion_pipeline: database, pools, connections.

Pools: `gpu` (LAION_GPU_SLOTS, default 1: one per GPU) for CLIP inference and index
building, `download` (LAION_DOWNLOAD_SLOTS, default 4) for img2dataset tasks. The Spark and
storage connections come from AIRFLOW_CONN_* environment variables (see the README).
"""

from __future__ import annotations

import os
import subprocess
import sys


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
