"""SIGKILL the embedding stage in the middle of a partition, rerun: finished partitions are
kept, the rest redone, and the result equals a clean run's. The tars' folder is their part
(``tars``): partitions are named ``tars_<k>``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from waiting import wait_until

EMBED = """
import json, sys
from stages.embeddings import EmbeddingSettings, compute_embeddings
from stages.layout import RunLayout
tars = json.loads(sys.argv[1])
settings = EmbeddingSettings(clip_model=sys.argv[3], clip_batch_size=8, num_prepro_workers=1)
compute_embeddings(tars, RunLayout(sys.argv[2]), settings, samples=32, samples_per_partition=8)
"""


def write_tars(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    tars = []
    for shard in range(4):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(8):
                key = f"{shard:05d}{i:04d}"
                image = io.BytesIO()
                Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(image, "JPEG")
                for ext, data in (("jpg", image.getvalue()), ("txt", f"caption {key}".encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        tars.append(str(path))
    return tars


def vectors_by_key(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for meta in sorted((folder / "metadata").glob("*.parquet")):
        suffix = meta.stem[len("metadata_") :]  # the partition's name: <part>_<k>
        keys = pd.read_parquet(meta)["image_path"].tolist()
        vectors = np.load(folder / "img_emb" / f"img_emb_{suffix}.npy")
        out.update(zip(keys, vectors))
    return out


def embed_command(tars: list[str], output: Path, model: str) -> list[str]:
    """The command that embeds ``tars`` into ``output``, the embeddings folder of the run ``output.parent``."""
    return [sys.executable, "-c", EMBED, json.dumps(tars), str(output.parent), model]


ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


# Above the deadlines of its waits (240 + 600 + 600 s), so that those report first.
@pytest.mark.timeout(1800)
def test_a_killed_embedding_run_resumes_at_partition_granularity(tmp_path: Path, demo_clip_model: str) -> None:
    tars = write_tars(tmp_path / "tars")
    killed = tmp_path / "killed" / "embeddings"
    worker = subprocess.Popen(embed_command(tars, killed, demo_clip_model), env=ENV, start_new_session=True)
    try:
        # Partition 0 is done and clip-retrieval has opened partition 1's output folders.
        wait_until(
            lambda: (killed / "_done" / "tars_00000").exists() and (killed / "_partial" / "tars_00001" / "img_emb").exists(),
            "partition 1 under way", process=worker,
        )  # fmt: skip
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    done_before = {p.name for p in (killed / "_done").iterdir()}
    assert "tars_00000" in done_before and len(done_before) < 4
    kept = (killed / "img_emb" / "img_emb_tars_00000.npy").stat().st_mtime_ns
    subprocess.run(embed_command(tars, killed, demo_clip_model), env=ENV, check=True, timeout=600)
    assert (killed / "img_emb" / "img_emb_tars_00000.npy").stat().st_mtime_ns == kept  # partition 0 not redone
    assert not (killed / "_partial").exists() or not list((killed / "_partial").iterdir())

    clean = tmp_path / "clean" / "embeddings"
    subprocess.run(embed_command(tars, clean, demo_clip_model), env=ENV, check=True, timeout=600)
    resumed, fresh = vectors_by_key(killed), vectors_by_key(clean)
    assert len(resumed) == 32 and resumed.keys() == fresh.keys()
    for key in fresh:
        np.testing.assert_allclose(resumed[key], fresh[key], rtol=1e-4, atol=1e-5)
    assert json.loads((killed / "_SUCCESS.json").read_text())["count"] == 32
    # clip-retrieval's per-partition stats, now kept in the worker's own process: one file
    # per partition, adding up to every sample.
    stats = sorted((clean / "stats").glob("*.json"))
    assert [p.name for p in stats] == [f"stats_tars_{i:05d}.json" for i in range(len(stats))] and len(stats) > 1
    assert sum(json.loads(p.read_text())["sample_count"] for p in stats) == 32
