"""The demo's CLIP weights: a small open_clip architecture, untrained, from a fixed seed.

No installable package ships pretrained CLIP weights and the demo runs offline, so the
demo and the tests use these: real computations through clip-retrieval's normal loading
path (``open_clip:<arch>/<file>``), but embeddings without meaning. They exercise the
mechanics (shapes, counts, an image retrieving itself), never search quality.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_ARCH = "ViT-S-32"


def ensure_demo_weights(path: str | Path, *, arch: str = DEMO_ARCH, seed: int = 0) -> str:
    """Write the weights once (atomically) and return the ``clip_model`` string for them."""
    path = Path(path).resolve()
    if not path.exists():
        import open_clip
        import torch

        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    # clip-retrieval splits on the first "/" after the architecture: an absolute path
    # therefore shows as a double slash.
    return f"open_clip:{arch}/{path}"
