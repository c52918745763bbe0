"""SIGKILL build_index in the middle of its build, rerun: no partial index is ever visible
and the rebuilt index holds every embedding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUILD = """
import sys
from stages.index import build_indexes
build_indexes(sys.argv[1], sys.argv[2], index_key="OPQ32_128,IVF64,PQ32x8", recall_queries=100)
"""


def test_a_killed_index_build_leaves_nothing_and_rebuilds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    embeddings = tmp_path / "embeddings"
    for sub in ("img_emb", "text_emb"):
        (embeddings / sub).mkdir(parents=True)
        centers = rng.normal(size=(200, 128))
        vectors = centers[rng.integers(200, size=20000)] + 0.1 * rng.normal(size=(20000, 128))
        np.save(embeddings / sub / f"{sub}_0.npy", (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype("float32"))
    index = tmp_path / "index"
    worker = subprocess.Popen([sys.executable, "-c", BUILD, str(embeddings), str(index)], start_new_session=True)
    time.sleep(8)  # model loading done, OPQ training under way
    assert worker.poll() is None, "the build finished before it could be killed: make it bigger"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert not index.exists() or not [p for p in index.iterdir() if p.suffix == ".index" or p.name == "_SUCCESS.json"]
    subprocess.run([sys.executable, "-c", BUILD, str(embeddings), str(index)], check=True, timeout=900)
    import faiss

    for name in ("image", "text"):
        assert faiss.read_index(str(index / f"{name}.index")).ntotal == 20000
    assert (index / "_SUCCESS.json").exists()
