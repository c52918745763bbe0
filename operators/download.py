from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator
from stages.images.download import DownloadSettings, download_part
from stages.images.retry import RetrySettings, retry_part


class ListPartsOperator(StageOperator):
    """Returns the names (``part-00000`` ...) of the dedup parts whose download or, given
    ``clip_model``, whose embeddings have not finished: the per-part tasks map over them.
    Parts of earlier batches, done, get no task (a dataset of thousands of parts shows only
    its new ones).

    :param pending_only: False lists every current part (a retry of failed samples looks at all)
    :param clip_model: also list the parts not yet embedded with this model (templated)
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "clip_model")

    def __init__(self, *, pending_only: bool = True, clip_model: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pending_only = pending_only
        self.clip_model = clip_model

    def run(self, context: Any) -> dict[str, Any]:
        stats = self.layout.dedup_stats()
        parts = self.layout.current_parts(stats)
        if not self.pending_only:
            return {"parts": parts}
        pending = self.layout.pending_parts(stats, clip_model=self.clip_model or None)
        self.log.info("%d of %d parts to download or embed", len(pending), len(parts))
        return {"parts": pending}

    def execute(self, context: Any) -> list[str]:  # type: ignore[override]
        return super().execute(context)["parts"]


class DownloadImagesOperator(StageOperator):
    """img2dataset over one dedup part into ``images/<part>/`` (webdataset shards).

    :param part: the dedup part's name, e.g. ``part-00000`` (templated)
    :param settings: :class:`~stages.images.download.DownloadSettings` by field name (templated)
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "part")
    settings_class = DownloadSettings

    def __init__(self, *, part: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.part = part

    def part_arguments(self) -> tuple[str, str, Any]:
        """(the dedup part's URL, its image folder, the stage's settings) for the stage functions."""
        part = str(self.part)
        return self.layout.part(part), self.layout.part_images(part), self.stage_settings()

    def run(self, context: Any) -> dict[str, Any]:
        version = self.layout.part_version(str(self.part))
        numbers = download_part(*self.part_arguments(), dedup_version=version)
        self.log.info(
            "%s: %d of %d samples downloaded in %.1f s", self.part, numbers["successes"], numbers["count"], numbers["seconds"]
        )
        numbers["samples_per_second"] = round(numbers["count"] / numbers["seconds"], 2) if numbers["seconds"] else None
        numbers.pop("shards")
        if numbers.pop("complete"):  # later runs leave the part out
            self.layout.download_marker(str(self.part), version).mark_done({"dedup_version": version}, numbers)
        return numbers


class RetryFailedSamplesOperator(DownloadImagesOperator):
    """Downloads again the samples of one part that failed for a transient reason.

    Recovered samples land in new shards of ``images/<part>/`` (see :mod:`stages.images.retry`);
    the image settings are the part's own. The next ``laion_pipeline`` run embeds and
    indexes them and counts them in its report.

    :param settings: :class:`~stages.images.retry.RetrySettings` by field name (templated)
    """

    settings_class = RetrySettings

    def run(self, context: Any) -> dict[str, Any]:
        numbers = retry_part(*self.part_arguments(), dedup_version=self.layout.part_version(str(self.part)))
        if numbers["recovered"]:  # new shards: the next run lists the part and embeds them
            self.layout.part_embeddings_marker(str(self.part)).clear()
        self.log.info("%s: %d samples retried, %d recovered", self.part, numbers["retried"], numbers["recovered"])
        return numbers
