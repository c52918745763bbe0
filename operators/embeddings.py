from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.embeddings import EmbeddingSettings, compute_embeddings
from stages.errors import NothingToDo
from stages.images.shards import summarize_shards
from stages.report import downloads_line


class ClipEmbeddingsOperator(StageOperator):
    """clip-retrieval inference over every finished shard of the run (CUDA when present).

    A run whose downloads all failed has nothing to embed: the task fails at once, saying
    how many samples were tried and why they failed, and the report shows the rest.

    ``settings``: :class:`stages.embeddings.EmbeddingSettings` by field name (templated).
    """

    settings_class = EmbeddingSettings

    def run(self, context: Any) -> dict[str, Any]:
        layout, settings = self.layout, self.stage_settings()
        parts = layout.current_parts()
        downloads = summarize_shards(layout.images, parts)
        if not downloads["successes"]:
            raise NothingToDo(f"nothing to embed: {downloads_line(downloads)}")
        numbers = compute_embeddings(layout.current_shards(parts), layout, settings, samples=downloads["successes"])
        self.log.info("%d image embeddings of dimension %d", numbers["count"], numbers["dim"])
        return numbers
