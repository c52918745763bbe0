from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.embeddings import EmbeddingSettings, compute_embeddings
from stages.images.shards import summarize_shards


class ClipEmbeddingsOperator(StageOperator):
    """clip-retrieval inference over every finished shard of the run (CUDA when present).

    ``settings``: :class:`stages.embeddings.EmbeddingSettings` by field name (templated).
    """

    settings_class = EmbeddingSettings

    def run(self, context: Any) -> dict[str, Any]:
        layout = self.layout
        parts = layout.current_parts()
        numbers = compute_embeddings(
            layout.current_shards(parts),
            layout,
            self.stage_settings(),
            samples=summarize_shards(layout.images, parts)["successes"],
        )
        self.log.info("%d image embeddings of dimension %d", numbers["count"], numbers["dim"])
        return numbers
