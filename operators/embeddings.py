from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator
from stages.embeddings import EmbeddingSettings, embed_part
from stages.images.shards import summarize_shards


class ClipEmbeddingsOperator(StageOperator):
    """clip-retrieval inference over the finished shards of one dedup part (CUDA when present).

    One task per part, mapped with the part's download: it starts as soon as that download
    ends, and as many run at once as the ``gpu`` pool has slots. A part whose downloads all
    failed has nothing to embed: its task records zero embeddings (build_index fails when
    every part has none).

    :param part: the dedup part's name, e.g. ``part-00000`` (templated)
    :param settings: :class:`stages.embeddings.EmbeddingSettings` by field name (templated)
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "part")
    settings_class = EmbeddingSettings

    def __init__(self, *, part: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.part = part

    def run(self, context: Any) -> dict[str, Any]:
        layout, settings, part = self.layout, self.stage_settings(), str(self.part)
        tars = layout.current_shards([part])
        samples = summarize_shards(layout.images, [part])["successes"]
        numbers = embed_part(layout, part, tars, settings, samples=samples)
        self.log.info("%s: %d image embeddings of dimension %d", part, numbers["count"], numbers["dim"])
        return numbers
