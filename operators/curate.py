from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.curate.stage import CurationSettings, curate
from stages.embeddings import gather_embeddings
from stages.errors import NothingToDo
from stages.images.shards import summarize_shards
from stages.report import downloads_line


class CurateOperator(StageOperator):
    """Scores every embedded sample (clip_score, an optional classifier) and keeps those the
    filters pass in ``curated/``, which build_index indexes; see :mod:`stages.curate.stage`.

    ``settings``: :class:`stages.curate.stage.CurationSettings` by field name (templated).
    Without settings (a DAG that only removes a batch) the curation last run is repeated
    with its own settings.
    """

    settings_class = CurationSettings

    def run(self, context: Any) -> dict[str, Any]:
        layout = self.layout
        # Every part's embeddings, each made by its own task, recorded as one folder first.
        embedded = gather_embeddings(layout, {part: layout.current_shards([part]) for part in layout.current_parts()})
        if not embedded["count"]:
            raise NothingToDo(f"nothing to index: {downloads_line(summarize_shards(layout.images, layout.current_parts()))}")
        if self.settings:
            settings = self.stage_settings()
        else:
            recorded = (layout.curation_marker.read() or {}).get("settings") or {}
            settings = CurationSettings.recorded(recorded)
        numbers = curate(layout, settings)
        self.log.info(
            "Curated %s samples: %s kept, %s below the CLIP score, %s by the classifier, %s near duplicates",
            numbers["embedded"], numbers["kept"], numbers["below_clip_score"], numbers["classifier"], numbers["near_duplicates"],
        )  # fmt: skip
        return {k: v for k, v in numbers.items() if k not in ("clip_score_histogram", "near_duplicate_pairs", "settings")}
