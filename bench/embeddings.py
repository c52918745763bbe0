"""embeddings: our stage (clip-retrieval per partition) vs a bare torch loop of the same model and batch size.

The bare loop times only the model: images already decoded and preprocessed into tensors,
captions already tokenized, then encode_image and encode_text batch after batch. It is
the model's own speed on this machine; the stage's time is everything the DAG's task
spends in compute_embeddings (model load, decoding, preprocessing, writing).
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.data import jpeg_files, webdataset_tars
from bench.harness import PY, Bench, env_for_tools, run_json
from bench.sizes import Size

SAMPLES_PER_TAR = 64


def stage(out: str, clip_model: str, batch_size: int, tars: list[str]) -> dict[str, Any]:
    from stages.embeddings import EmbeddingSettings, compute_embeddings
    from stages.layout import RunLayout

    settings = EmbeddingSettings(clip_model=clip_model, clip_batch_size=batch_size)
    started = time.perf_counter()
    numbers = compute_embeddings(tars, RunLayout(out), settings, samples=len(tars) * SAMPLES_PER_TAR)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "count": numbers["count"], "text_count": numbers["text_count"],
            "compute_seconds": numbers["compute_seconds"]}


def bare_loop(clip_model: str, batch_size: int, tars: list[str]) -> dict[str, Any]:
    import torch
    from all_clip.main import load_clip_without_warmup
    from PIL import Image

    model, preprocess, tokenizer = load_clip_without_warmup(clip_model, False, "cpu", None)
    images, texts = [], []
    for tar in tars:
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                data = archive.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    images.append(preprocess(Image.open(io.BytesIO(data))))
                elif member.name.endswith(".txt"):
                    texts.append(data.decode())
    pixels, tokens = torch.stack(images), tokenizer(texts)
    with torch.no_grad():
        model.encode_image(pixels[:2]), model.encode_text(tokens[:2])  # first-call allocations, not timed
        started = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            model.encode_image(pixels[start:start + batch_size])
            model.encode_text(tokens[start:start + batch_size])
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "count": len(pixels), "torch_threads": torch.get_num_threads()}


def run(size: Size, work: Path, clip_model: str) -> Bench:
    www = work / "cache" / f"www-{size.images}"
    names = jpeg_files(www, max(size.images, size.embed_samples))[: size.embed_samples]
    tars = webdataset_tars(work / "cache" / f"tars-{size.embed_samples}", www, names, SAMPLES_PER_TAR)
    out = work / "embeddings" / "stage"
    bench = Bench("embeddings", settings={"samples": size.embed_samples, "batch_size": size.embed_batch,
                                          "clip_model": clip_model.split("/")[0] + " (demo weights, untrained)",
                                          "tars": len(tars), "device": "cpu", "image": True, "text": True})
    bench.commands = {"stage": [PY, "-m", "bench.workers", "embed-stage", str(out), clip_model, str(size.embed_batch), *tars],
                      "bare": [PY, "-m", "bench.workers", "embed-bare", clip_model, str(size.embed_batch), *tars]}

    def stage_case(rep: int) -> dict[str, Any]:
        shutil.rmtree(out, ignore_errors=True)
        done = run_json(bench.commands["stage"], env=env_for_tools())
        return {**done, "samples_per_s": round(done["count"] / done["seconds"], 2)}

    def bare_case(rep: int) -> dict[str, Any]:
        done = run_json(bench.commands["bare"], env=env_for_tools())
        return {**done, "samples_per_s": round(done["count"] / done["seconds"], 2)}

    med = bench.interleave({"stage": stage_case, "bare": bare_case}, size.reps)
    ratio = bench.ratio("stage_over_bare", med["stage"]["samples_per_s"], med["bare"]["samples_per_s"])
    bench.target("stage / bare model loop", ratio, ">=", 0.85)
    return bench
