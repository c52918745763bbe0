"""Query a finished run: text or image embeddings against its knn indexes."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fsspec.core import url_to_fs

from stages import storage


@dataclass
class Hit:
    key: str
    caption: str
    url: str
    score: float


class RunIndex:
    """The image index of one run and its metadata rows, in index order."""

    def __init__(self, output_root: str) -> None:
        self.output_root = output_root

    @cached_property
    def index(self) -> Any:
        import faiss

        url = storage.join(self.output_root, "index", "image.index")
        if storage.is_remote(url):
            fs, path = url_to_fs(url)
            local = os.path.join(tempfile.mkdtemp(prefix="laion-search-"), "image.index")
            fs.get_file(path, local)
            url = local
        # IVF indexes are memory-mapped: the file's pages, not a copy, back the search.
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        try:
            return faiss.read_index(url, flags)
        except RuntimeError:  # index types that cannot be mapped are read whole
            return faiss.read_index(url)

    @cached_property
    def rows(self) -> Any:
        import pandas as pd

        folder = storage.join(self.output_root, "embeddings", "metadata")
        parts = storage.list_files(folder, "*.parquet")
        frames = []
        for part in parts:
            fs, path = url_to_fs(part)
            with fs.open(path, "rb") as f:
                frames.append(pd.read_parquet(f))
        return pd.concat(frames, ignore_index=True)

    def search_vector(self, vector: Any, k: int = 10) -> list[Hit]:
        import numpy as np

        query = np.asarray(vector, dtype="float32").reshape(1, -1)
        query /= np.linalg.norm(query) or 1.0
        scores, ids = self.index.search(query, k)
        hits = []
        for score, i in zip(scores[0].tolist(), ids[0].tolist()):
            if i < 0:
                continue
            row = self.rows.iloc[i]
            hits.append(Hit(str(row["image_path"]), str(row.get("caption", "")), str(row.get("url", "")), float(score)))
        return hits


class TextEncoder:
    """Encodes text queries with the run's CLIP model (any clip-retrieval model string)."""

    def __init__(self, clip_model: str) -> None:
        from all_clip import load_clip

        self.model, _, self.tokenizer = load_clip(clip_model, use_jit=False, device="cpu")

    def encode(self, text: str) -> Any:
        import torch

        with torch.no_grad():
            emb = self.model.encode_text(self.tokenizer([text]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb[0].cpu().numpy()
