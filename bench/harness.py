"""What every benchmark shares: interleaved repetitions, medians, targets, the machine, the results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PACKAGES = ("apache-airflow", "pyspark", "duckdb", "img2dataset", "clip-retrieval", "open-clip-torch", "torch",
            "autofaiss", "faiss-cpu", "opencv-python-headless", "numpy", "pyarrow")


@dataclass
class Bench:
    """One benchmark's record: settings, commands, every repetition, medians, ratios, targets."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, Any] = field(default_factory=dict)
    repetitions: list[dict[str, Any]] = field(default_factory=list)
    median: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def interleave(self, cases: Mapping[str, Callable[[int], dict[str, Any]]], reps: int) -> dict[str, dict[str, Any]]:
        """Run each case once per repetition, in turn, so drifting load hits all of them alike.

        Every repetition is kept; the medians of each numeric result are returned (and kept).
        """
        for rep in range(reps):
            row: dict[str, Any] = {"rep": rep, "loadavg": os.getloadavg()}
            for case, run in cases.items():
                row[case] = run(rep)
            self.repetitions.append(row)
        for case in cases:
            self.median[case] = medians([row[case] for row in self.repetitions if case in row])
        return self.median

    def ratio(self, name: str, numerator: float, denominator: float) -> float:
        self.ratios[name] = round(numerator / denominator, 4) if denominator else float("nan")
        return self.ratios[name]

    def target(self, name: str, value: float, op: str, limit: float) -> None:
        met = value >= limit if op == ">=" else value <= limit
        self.targets.append({"name": name, "value": round(value, 4), "op": op, "limit": limit, "met": bool(met)})

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "name"}


def medians(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric key over ``rows`` (non-numbers: the first row's value)."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(statistics.median(r[key] for r in rows), 4)
        elif isinstance(value, dict):
            out[key] = medians([r[key] for r in rows])
        else:
            out[key] = value
    return out


def run_timed(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path = REPO,
              timeout: float = 3600, log: Path | None = None) -> dict[str, Any]:
    """Run a command to completion: its wall seconds and stdout (its output also goes to ``log``)."""
    started = time.perf_counter()
    proc = subprocess.run(list(argv), env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - started
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} ... exited {proc.returncode}:\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    return {"seconds": round(seconds, 4), "stdout": proc.stdout}


def run_json(argv: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """Run a bench worker that prints one JSON object as its last stdout line; add the wall time."""
    done = run_timed(argv, **kwargs)
    result = json.loads(done["stdout"].strip().splitlines()[-1])
    return {**result, "wall_seconds": done["seconds"]}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory_mib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "loadavg_start": os.getloadavg(),
    }


def results_path(results_dir: Path, size: str) -> Path:
    """``<results_dir>/<date>-<size>.json``; a second run the same day gets ``-2``, ``-3`` ..."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date.today().isoformat()}-{size}"
    path, n = results_dir / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = results_dir / f"{stem}-{n}.json"
    return path


def write_results(path: Path, record: dict[str, Any]) -> None:
    """Rewritten after every benchmark, so a long run shows (and keeps) what it has measured."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def env_for_tools() -> dict[str, str]:
    """The environment the Makefile gives the pipeline: loopback Spark, the venv's tools first."""
    bin_dir = str(Path(PY).parent)
    return {
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": PY,
        "PYSPARK_DRIVER_PYTHON": PY,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
    }
