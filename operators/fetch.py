from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator


class FetchMetadataOperator(StageOperator):
    """Copies the raw metadata sources into ``<output_root>/raw/``.

    :param metadata_urls: http(s)://, s3://, file:// URLs, local paths or fsspec globs (templated)
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "metadata_urls")

    def __init__(self, *, metadata_urls: list[str] | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metadata_urls = metadata_urls

    def run(self, context: Any) -> dict[str, Any]:
        from stages.fetch import fetch_metadata

        urls = [self.metadata_urls] if isinstance(self.metadata_urls, str) else list(self.metadata_urls)
        numbers = fetch_metadata(urls, self.layout.raw)
        self.log.info("Fetched %d files, kept %d already fetched", numbers["files_fetched"], numbers["files_skipped"])
        return numbers
