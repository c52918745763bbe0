from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator


class BuildIndexOperator(StageOperator):
    """autofaiss indexes over the image and the text embeddings, with measured recall@10.

    :param max_index_memory_usage: autofaiss memory budget for each index, e.g. "4G" (templated)
    :param current_memory_available: memory autofaiss may use while building (templated)
    :param index_key: force a faiss index key; empty lets autofaiss choose (templated)
    """

    template_fields: Sequence[str] = (
        *StageOperator.template_fields,
        "max_index_memory_usage",
        "current_memory_available",
        "index_key",
    )

    def __init__(
        self,
        *,
        max_index_memory_usage: str = "4G",
        current_memory_available: str = "8G",
        index_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_index_memory_usage = max_index_memory_usage
        self.current_memory_available = current_memory_available
        self.index_key = index_key

    def run(self, context: Any) -> dict[str, Any]:
        from stages.index import build_indexes
        from stages.search import publish_search_files

        numbers = build_indexes(
            self.path("embeddings"),
            self.path("index"),
            max_index_memory_usage=str(self.max_index_memory_usage),
            current_memory_available=str(self.current_memory_available),
            index_key=str(self.index_key) if self.index_key not in (None, "", "None") else None,
        )
        # index/metadata (clip-retrieval's layout) and the shards' offset tables, for search
        numbers["search"] = publish_search_files(str(self.output_root))
        for name in ("image", "text"):
            self.log.info("%s index %s: recall@10 %s", name, numbers[name]["index_key"], numbers[name]["recall_at_10"])
        return {**numbers, **{f"{n}_recall_at_10": numbers[n]["recall_at_10"] for n in ("image", "text")}}
