from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.errors import NothingToDo
from stages.index.build import KINDS, IndexSettings, build_indexes
from stages.index.search_files import publish_search_files


class BuildIndexOperator(StageOperator):
    """autofaiss indexes over the image and the text embeddings curation kept, built or grown in place,
    with measured recall@10, and the files a search service reads beside them.

    ``settings``: :class:`stages.index.build.IndexSettings` by field name (templated).
    """

    settings_class = IndexSettings

    def run(self, context: Any) -> dict[str, Any]:
        layout = self.layout
        curated = layout.curation_marker.recorded()
        if not curated["kept"]:
            raise NothingToDo(
                f"nothing to index: curation kept none of the {curated['embedded']} embedded samples "
                f"({curated['below_clip_score']} below the CLIP score, {curated['classifier']} by the classifier, "
                f"{curated['near_duplicates']} near duplicates)"
            )
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
