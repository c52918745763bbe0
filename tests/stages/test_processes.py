"""Spawned tool workers inside an Airflow task must not re-import the task's entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# An entry point that, like Airflow's inside a task, fails when imported again (Airflow gives
# task processes an unparsable database URL, and `import airflow` parses it). The worker's
# target, os._exit(7), is found by name without the entry point.
ENTRY_POINT = """
import multiprocessing, os, sys
if __name__ != "__main__":
    raise RuntimeError("the entry point was imported again in a spawned worker")
sys.path.insert(0, sys.argv[2])
from stages.processes import spawn_without_main

process = multiprocessing.get_context("spawn").Process(target=os._exit, args=(7,))
if sys.argv[1] == "guarded":
    with spawn_without_main():
        process.start()
else:
    process.start()
process.join(60)
print(process.exitcode)
"""


def exit_code_of_worker(tmp_path: Path, mode: str) -> str:
    script = tmp_path / "entry_point.py"
    script.write_text(ENTRY_POINT)
    done = subprocess.run([sys.executable, str(script), mode, str(REPO)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_spawned_workers_start_without_the_entry_point(tmp_path: Path) -> None:
    assert exit_code_of_worker(tmp_path, "plain") == "1"  # the worker died importing the entry point
    assert exit_code_of_worker(tmp_path, "guarded") == "7"  # the worker ran its target
