from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.index.build import IndexSettings, build_indexes
from stages.index.search_files import publish_search_files


class BuildIndexOperator(StageOperator):
    """autofaiss indexes over the image and the text embeddings, with measured recall@10,
    and the files a search service reads beside them.

    ``settings``: :class:`stages.index.build.IndexSettings` by field name (templated).
    """

    settings_class = IndexSettings

    def run(self, context: Any) -> dict[str, Any]:
        numbers = build_indexes(self.layout, self.stage_settings())
        numbers["search"] = publish_search_files(self.layout)
        for name in ("image", "text"):
            self.log.info("%s index %s: recall@10 %s", name, numbers[name]["index_key"], numbers[name]["recall_at_10"])
        return {**numbers, **{f"{n}_recall_at_10": numbers[n]["recall_at_10"] for n in ("image", "text")}}
