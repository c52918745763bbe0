"""A user-supplied scorer over the image embeddings (an NSFW or watermark tagger, as LAION-5B's).

``classifier`` names either an importable callable, ``"package.module:function"``, or a
model file: a TorchScript archive (``torch.jit.save``) or a whole pickled module
(``torch.save(model)``). Either is called on a float32 array of image embeddings, one row
per sample (L2-normalised, as clip-retrieval writes them), and returns one score per row.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

Scorer = Callable[[Any], Any]


def load_classifier(spec: str) -> Scorer:
    """The scorer ``spec`` names; a clear error naming the param when it cannot be loaded."""
    if ":" in spec and not os.path.exists(spec):
        module_name, _, name = spec.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"classifier {spec!r}: cannot import {name!r} from {module_name!r} ({error})") from None
        if not callable(found):
            raise ValueError(f"classifier {spec!r}: {name} is not callable")
        return found
    if not os.path.isfile(spec):
        raise ValueError(f"classifier {spec!r}: no such model file, and not a 'module:callable' name")
    return torch_scorer(spec)


def torch_scorer(path: str) -> Scorer:
    import torch

    try:
        model = torch.jit.load(path, map_location="cpu")
    except RuntimeError:  # not TorchScript: a pickled module
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(f"classifier {path!r}: neither a TorchScript archive nor a saved torch module ({error})") from None
    if not callable(model):
        raise ValueError(f"classifier {path!r} holds a {type(model).__name__}, not a model")
    model.eval()

    def score(vectors: Any) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(vectors)).float().numpy()

    return score


def scores_of(scorer: Scorer, vectors: Any, spec: str) -> Any:
    """One float32 score per row of ``vectors``; a clear error when the scorer gives another shape."""
    import numpy as np

    scores = np.asarray(scorer(vectors), dtype="float32").reshape(-1) if len(vectors) else np.zeros(0, dtype="float32")
    if scores.shape != (len(vectors),):
        raise ValueError(f"classifier {spec!r} returned {scores.size} scores for {len(vectors)} embeddings: expected one per row")
    return scores
