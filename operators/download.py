from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator
from stages.images.download import DownloadSettings, download_part
from stages.images.retry import RetrySettings, retry_part


class ListPartsOperator(StageOperator):
    """Returns the dedup part names (``part-00000`` ...): the download stage maps over them."""

    def run(self, context: Any) -> dict[str, Any]:
        return {"parts": self.layout.current_parts()}

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
        numbers = download_part(*self.part_arguments(), dedup_version=self.layout.dedup_version())
        self.log.info(
            "%s: %d of %d samples downloaded in %.1f s", self.part, numbers["successes"], numbers["count"], numbers["seconds"]
        )
        numbers["samples_per_second"] = round(numbers["count"] / numbers["seconds"], 2) if numbers["seconds"] else None
        numbers.pop("shards")
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
        numbers = retry_part(*self.part_arguments(), dedup_version=self.layout.dedup_version())
        self.log.info("%s: %d samples retried, %d recovered", self.part, numbers["retried"], numbers["recovered"])
        return numbers
