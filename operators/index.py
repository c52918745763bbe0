from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.embeddings import gather_embeddings
from stages.errors import NothingToDo
from stages.images.shards import summarize_shards
from stages.index.build import KINDS, IndexSettings, build_indexes
from stages.index.search_files import publish_search_files
from stages.report import downloads_line


class BuildIndexOperator(StageOperator):
    """autofaiss indexes over the image and the text embeddings, built or grown in place,
    with measured recall@10, and the files a search service reads beside them.

    ``settings``: :class:`stages.index.build.IndexSettings` by field name (templated).
    """

    settings_class = IndexSettings

    def run(self, context: Any) -> dict[str, Any]:
        layout = self.layout
        # Every part's embeddings, each made by its own task, recorded as one folder first.
        embedded = gather_embeddings(layout, {part: layout.current_shards([part]) for part in layout.current_parts()})
        if not embedded["count"]:
            raise NothingToDo(f"nothing to index: {downloads_line(summarize_shards(layout.images, layout.current_parts()))}")
        numbers = build_indexes(layout, self.stage_settings())
        numbers["search"] = publish_search_files(self.layout)
        for name in KINDS:
            kind = numbers[name]
            action = "skipped" if numbers.get("skipped") else kind.get("action")
            why = f" ({kind['retrain_reason']})" if action == "retrained" else ""
            self.log.info(
                "%s index %s: %s%s, %s vectors, recall@10 %s", name, kind["index_key"], action, why, kind["ntotal"], kind["recall_at_10"]
            )
            # The XCom names how many npy files the index holds; their list stays in the marker.
            numbers[name] = {**{k: v for k, v in kind.items() if k != "files"}, "npy_files": len(kind.get("files", {}))}
        return {**numbers, **{f"{n}_recall_at_10": numbers[n]["recall_at_10"] for n in KINDS}}
