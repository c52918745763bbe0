"""Queries as CLIP embeddings, from the model that embedded the run."""

from __future__ import annotations

from typing import Any


class ClipEncoder:
    """Encodes text and image queries with a run's CLIP model (any clip-retrieval model string)."""

    def __init__(self, clip_model: str) -> None:
        from all_clip import load_clip

        self.model, self.preprocess, self.tokenizer = load_clip(clip_model, use_jit=False, device="cpu")

    def encode_text(self, text: str) -> Any:
        import torch

        with torch.no_grad():
            return self._normalized(self.model.encode_text(self.tokenizer([text])))

    def encode_image(self, image: Any) -> Any:
        """``image`` is a PIL image."""
        import torch

        with torch.no_grad():
            return self._normalized(self.model.encode_image(self.preprocess(image.convert("RGB")).unsqueeze(0)))

    @staticmethod
    def _normalized(emb: Any) -> Any:
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb[0].float().cpu().numpy()
