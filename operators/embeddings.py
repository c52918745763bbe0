from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator


class ClipEmbeddingsOperator(StageOperator):
    """clip-retrieval inference over every finished shard of the run (CUDA when present).

    :param clip_model: any model string clip-retrieval accepts (templated)
    :param batch_size: inference batch size (templated)
    :param num_prepro_workers: image decoding workers; by default every core on a GPU, 2 on a CPU
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "clip_model", "batch_size")

    def __init__(self, *, clip_model: str, batch_size: int | str = 256, num_prepro_workers: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_model = clip_model
        self.batch_size = batch_size
        self.num_prepro_workers = num_prepro_workers

    def run(self, context: Any) -> dict[str, Any]:
        from stages import storage
        from stages.download import current_parts, summarize_shards
        from stages.embeddings import compute_embeddings, list_tars

        parts = current_parts(storage.read_json(self.path("dedup", "_stats.json")))
        numbers = compute_embeddings(
            list_tars(self.path("images"), parts),
            self.path("embeddings"),
            samples=summarize_shards(self.path("images"), parts)["successes"],
            clip_model=str(self.clip_model),
            batch_size=int(self.batch_size),
            num_prepro_workers=self.num_prepro_workers,
        )
        self.log.info("%d image embeddings of dimension %d", numbers["count"], numbers["dim"])
        return numbers
