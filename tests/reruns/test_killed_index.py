"""SIGKILL build_index once the image index is built and the text index is training, rerun:
neither index is visible before both are complete, and the rebuilt pair holds every embedding.

A pair of indexes is one publication: ``image.index`` without its ``text.index`` (or with
the text index of other embeddings) is never current, so nothing of a killed build may
appear under a final name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from waiting import wait_until

BUILD = """
import sys
from stages.index.build import IndexSettings, build_indexes
from stages.layout import RunLayout
build_indexes(RunLayout(sys.argv[1]), IndexSettings(index_key="OPQ32_128,IVF64,PQ32x8"), recall_queries=100)
"""


@pytest.mark.timeout(1800)  # a build to its event (600 s at most), then a whole rebuild (900 s)
def test_a_killed_index_build_leaves_nothing_and_rebuilds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    embeddings = tmp_path / "curated"  # the kept samples' embeddings: what build_index reads
    for sub in ("img_emb", "text_emb"):
        (embeddings / sub).mkdir(parents=True)
        centers = rng.normal(size=(200, 128))
        vectors = centers[rng.integers(200, size=20000)] + 0.1 * rng.normal(size=(20000, 128))
        np.save(embeddings / sub / f"{sub}_0.npy", (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype("float32"))
    index = tmp_path / "index"
    scratch = tmp_path / "scratch"  # the build's temporary folders, where its progress is seen
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    worker = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], start_new_session=True, env=env)
    try:
        # The image index is complete in the staging folder; the text index is being built.
        wait_until(lambda: any(scratch.glob("laion-index-*/image_infos.json")), "a built image index", process=worker)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert not index.exists() or not [p for p in index.iterdir() if p.suffix == ".index" or p.name == "_SUCCESS.json"]
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], check=True, timeout=900, env=env)
    import faiss

    for name in ("image", "text"):
        assert faiss.read_index(str(index / f"{name}.index")).ntotal == 20000
    assert (index / "_SUCCESS.json").exists()
