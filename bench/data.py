"""Inputs the benchmarks generate: JPEGs to serve, URL parquets, raw LAION-like CSVs, clustered vectors.

Everything is made from what ships here (scikit-image's photographs, the bundled LAION rows)
and cached under the bench work folder by size, so repetitions and reruns reuse it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sampleweb.laion_rows import load_laion_rows

IMAGE_DIR = "img"


def jpeg_files(www: Path, n: int, seed: int = 7) -> list[str]:
    """``n`` distinct JPEGs under ``www/img/`` (150-600 px, like web images); their relative paths."""
    from sampleweb.images import make_distinct_jpegs

    folder = www / IMAGE_DIR
    names = [f"{IMAGE_DIR}/{i:06d}.jpg" for i in range(n)]
    if not (www / names[-1]).exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, make_distinct_jpegs(n, seed)):
            (www / name).write_bytes(image.data)
    return names


def captions(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` (URL, TEXT) rows drawn from the real LAION rows, with replacement."""
    rows = load_laion_rows().dropna()
    return rows.sample(n=n, replace=True, random_state=seed).reset_index(drop=True)


def url_parquet(path: Path, base_url: str, names: list[str]) -> Path:
    """A dedup-like part: one row per image URL, LAION's caption and extra columns."""
    rows = captions(len(names))
    table = pd.DataFrame({
        "SAMPLE_ID": np.arange(len(names), dtype="int64"),
        "URL": [f"{base_url}/{name}" for name in names],
        "TEXT": rows["TEXT"],
        "HEIGHT": 256, "WIDTH": 256, "LICENSE": "?", "NSFW": "UNLIKELY",
        "similarity": np.float64(0.31),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
    return path


def raw_csvs(folder: Path, rows: int, rows_per_file: int = 250_000, seed: int = 0) -> Path:
    """LAION's raw metadata shape: ``|``-delimited CSVs with about 10% duplicate and 1% invalid rows."""
    marker = folder / "_rows.json"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "seed": seed}:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):
        old.unlink()
    base = captions(min(rows, 2000), seed)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        ids = np.arange(start, start + n)
        # ~10% of rows repeat an earlier (URL, TEXT); their SAMPLE_ID differs, as in LAION's dumps.
        source = np.where(rng.random(n) < 0.1, rng.integers(0, start + n, n), ids)
        pick = source % len(base)
        ids_text = pd.Series(source).astype(str)
        urls = pd.Series(base["URL"].to_numpy()[pick]) + "?id=" + ids_text
        invalid = rng.random(n) < 0.01
        urls[invalid] = "ftp://example.invalid/" + ids_text[invalid]
        frame = pd.DataFrame({
            "SAMPLE_ID": ids, "URL": urls.to_numpy(), "TEXT": base["TEXT"].to_numpy()[pick],
            "HEIGHT": rng.integers(64, 2048, n), "WIDTH": rng.integers(64, 2048, n),
            "LICENSE": "?", "NSFW": np.where(rng.random(n) < 0.05, "NSFW", "UNLIKELY"),
            "similarity": rng.uniform(0.28, 0.45, n).round(6),
        })
        frame.to_csv(folder / f"part-{start // rows_per_file:05d}.csv", sep="|", index=False)
    marker.write_text(json.dumps({"rows": rows, "seed": seed}))
    return folder


def webdataset_tars(folder: Path, www: Path, names: list[str], per_tar: int, image_size: int = 256) -> list[str]:
    """img2dataset-shaped webdataset tars (jpg, txt, json per sample) of the served JPEGs, resized."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = captions(len(names))["TEXT"].tolist()
    tars = []
    for t, start in enumerate(range(0, len(names), per_tar)):
        tar_path = folder / f"{t:05d}.tar"
        tars.append(str(tar_path))
        if not tar_path.exists():
            end = min(start + per_tar, len(names))
            images = ((www / names[i]).read_bytes() for i in range(start, end))
            write_webdataset_tar(tar_path, t, start, images, texts[start:end], image_size)
    return tars


def write_webdataset_tar(path: Path, tar_index: int, first: int, images: Iterable[bytes], texts: Sequence[str],
                         image_size: int = 256) -> None:
    """One tar in img2dataset's webdataset layout: per sample a JPEG thumbnailed to
    ``image_size``, its caption and a json, keyed ``<tar_index><first + i>``; written
    under a temporary name and moved into place."""
    from PIL import Image

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i, (data, text) in enumerate(zip(images, texts)):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            image.thumbnail((image_size, image_size))
            jpg = io.BytesIO()
            image.save(jpg, format="JPEG", quality=95)
            key = f"{tar_index:05d}{first + i:05d}"
            members = {"jpg": jpg.getvalue(), "txt": text.encode(), "json": json.dumps({"key": key}).encode()}
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)


def clustered_vectors(n: int, dim: int = 512, clusters: int | None = None, latent: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors shaped like CLIP embeddings: a Gaussian mixture on a low-dimensional subspace, plus noise.

    Real embeddings cluster by topic and have a low intrinsic dimension; uniform random
    vectors have neither, and every index looks equally bad on them.
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, int(np.sqrt(n)))
    centers = rng.normal(size=(clusters, latent)).astype("float32")
    spread = rng.uniform(0.3, 0.8, size=(clusters, 1)).astype("float32")
    projection = rng.normal(size=(latent, dim)).astype("float32") / np.sqrt(latent)
    out = np.empty((n, dim), dtype="float32")
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.integers(0, clusters, m)
        z = centers[which] + spread[which] * rng.normal(size=(m, latent)).astype("float32")
        x = z @ projection + 0.05 * rng.normal(size=(m, dim)).astype("float32")
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def clip_like_vectors(n: int, dim: int = 512, clusters: int | None = None, latent: int = 64, seed: int = 0,
                      tail: float = 1.1, mean_weight: float = 0.65) -> np.ndarray:
    """Unit vectors with what CLIP embeddings have and an index's list count cannot be tuned to.

    - Many more topics than lists: ``40 sqrt(n)`` clusters by default, ten times the
      ``4 sqrt(n)`` lists autofaiss gives an IVF index (and 40 times the ``sqrt(n)`` of
      ``flat_key_within_budget``), so a list never matches a cluster.
    - Heavy-tailed topic sizes: cluster ``r`` (in a random order) draws a share proportional
      to ``1 / r ** tail`` of the rows: a few topics hold much of the data, most hold a few rows.
    - A shared mean direction: CLIP embeddings of unrelated images still have a cosine
      similarity of about 0.2-0.5; each vector gets ``mean_weight`` times one common unit
      vector before normalising (unrelated pairs: about ``w² / (1 + w²)``, 0.3 here).
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, int(40 * np.sqrt(n)))
    share = 1.0 / np.arange(1, clusters + 1) ** tail
    share = rng.permutation(share / share.sum())
    centers = rng.normal(size=(clusters, latent)).astype("float32")
    spread = rng.uniform(0.3, 0.8, size=(clusters, 1)).astype("float32")
    projection = rng.normal(size=(latent, dim)).astype("float32") / np.sqrt(latent)
    mean = rng.normal(size=dim).astype("float32")
    mean /= np.linalg.norm(mean)
    out = np.empty((n, dim), dtype="float32")
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.choice(clusters, size=m, p=share)
        z = centers[which] + spread[which] * rng.normal(size=(m, latent)).astype("float32")
        x = z @ projection + 0.05 * rng.normal(size=(m, dim)).astype("float32")
        x = x / np.linalg.norm(x, axis=1, keepdims=True) + mean_weight * mean
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
