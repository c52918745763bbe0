from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator


class ListPartsOperator(StageOperator):
    """Returns the dedup part names (``part-00000`` ...): the download stage maps over them."""

    def run(self, context: Any) -> dict[str, Any]:
        from stages import storage

        from stages.download import current_parts

        return {"parts": current_parts(storage.read_json(self.path("dedup", "_stats.json")))}

    def execute(self, context: Any) -> list[str]:  # type: ignore[override]
        return super().execute(context)["parts"]


class DownloadImagesOperator(StageOperator):
    """img2dataset over one dedup part into ``images/<part>/`` (webdataset shards).

    :param part: the dedup part's name, e.g. ``part-00000`` (templated)
    :param fetch_policy: FetchPolicy fields: allowed networks and download bounds (templated)
    """

    template_fields: Sequence[str] = (
        *StageOperator.template_fields,
        "part",
        "image_size",
        "resize_mode",
        "processes_count",
        "thread_count",
        "number_sample_per_shard",
        "timeout",
        "fetch_policy",
    )

    def __init__(
        self,
        *,
        part: str,
        image_size: int | str = 256,
        resize_mode: str = "border",
        processes_count: int | str = 1,
        thread_count: int | str = 32,
        number_sample_per_shard: int | str = 10000,
        timeout: int | str = 10,
        fetch_policy: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.part = part
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.processes_count = processes_count
        self.thread_count = thread_count
        self.number_sample_per_shard = number_sample_per_shard
        self.timeout = timeout
        self.fetch_policy = fetch_policy or {}

    def settings(self) -> Any:
        from stages.download import DownloadSettings
        from stages.safe_fetch import policy_from_params

        return DownloadSettings(
            image_size=int(self.image_size),
            resize_mode=str(self.resize_mode),
            processes_count=int(self.processes_count),
            thread_count=int(self.thread_count),
            number_sample_per_shard=int(self.number_sample_per_shard),
            timeout=int(self.timeout),
            fetch_policy=policy_from_params(self.fetch_policy),
        )

    def part_arguments(self) -> tuple[str, str, Any]:
        """(the dedup part's URL, its image folder, the download settings) for the stage functions."""
        return self.path("dedup", f"{self.part}.parquet"), self.path("images", str(self.part)), self.settings()

    def dedup_version(self) -> str:
        from stages import storage
        from stages.download import dedup_version

        return dedup_version(storage.read_json(self.path("dedup", "_stats.json")))

    def run(self, context: Any) -> dict[str, Any]:
        from stages.download import download_part

        numbers = download_part(*self.part_arguments(), dedup_version=self.dedup_version())
        self.log.info(
            "%s: %d of %d samples downloaded in %.1f s", self.part, numbers["successes"], numbers["count"], numbers["seconds"]
        )
        numbers["samples_per_second"] = round(numbers["count"] / numbers["seconds"], 2) if numbers["seconds"] else None
        numbers.pop("shards")
        return numbers


class RetryFailedSamplesOperator(DownloadImagesOperator):
    """Downloads again the samples of one part that failed for a transient reason.

    Recovered samples land in new shards of ``images/<part>/`` (see :mod:`stages.retry`);
    the image settings are the part's own. The next ``laion_pipeline`` run embeds and
    indexes them and counts them in its report.

    :param reasons: the transient failure reasons to retry (templated)
    """

    template_fields: Sequence[str] = (*DownloadImagesOperator.template_fields, "reasons")

    def __init__(self, *, reasons: list[str] | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reasons = reasons

    def run(self, context: Any) -> dict[str, Any]:
        from stages.retry import retry_part

        reasons = tuple([self.reasons] if isinstance(self.reasons, str) else self.reasons)
        numbers = retry_part(*self.part_arguments(), dedup_version=self.dedup_version(), reasons=reasons)
        self.log.info("%s: %d samples retried, %d recovered", self.part, numbers["retried"], numbers["recovered"])
        return numbers
