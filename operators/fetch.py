from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator
from stages.errors import InputError
from stages.lock import RootLock

ACTIVE_RUN_STATES = ("queued", "running")


def run_is_active(ti: Any, holder: Any) -> bool:
    """Whether the run that holds a lock is queued or running (a run Airflow no longer knows is not)."""
    try:
        state = ti.get_dagrun_state(dag_id=holder["dag_id"], run_id=holder["run_id"])
    except Exception:  # noqa: BLE001 - an unknown run (deleted, another database) holds nothing
        return False
    return str(getattr(state, "value", state)) in ACTIVE_RUN_STATES


class FetchMetadataOperator(StageOperator):
    """Takes the output root's lock (:mod:`stages.lock`: one run at a time writes a root;
    the report task gives it back), then copies the raw metadata sources into
    ``<output_root>/raw/``.

    Before anything, the settings in ``checks`` that later stages would only find wrong
    after hours of work (a blocklist that cannot be read, a classifier that cannot be
    loaded) are checked: a bad one fails the run here (:func:`stages.curate.check_settings`).

    :param metadata_urls: http(s)://, s3://, file:// URLs, local paths or fsspec globs (templated)
    :param checks: params by name to check first (templated)
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "metadata_urls", "checks")
    lock_wait_seconds = 24 * 3600  # how long a run waits for another run on the same root

    def __init__(self, *, metadata_urls: list[str] | str, checks: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metadata_urls = metadata_urls
        self.checks = checks or {}

    def run(self, context: Any) -> dict[str, Any]:
        from stages.fetch import fetch_metadata

        if self.checks:
            from stages.curate import check_settings

            try:
                self.log.info("Settings checked: %s", check_settings(self.checks))
            except (TypeError, ValueError, OSError) as error:
                raise InputError(f"{self.task_id}: bad setting: {error}") from error
        ti = context["ti"]
        lock = RootLock(str(self.output_root), {"dag_id": ti.dag_id, "run_id": ti.run_id})
        taken = lock.acquire(lambda holder: run_is_active(ti, holder), wait_seconds=self.lock_wait_seconds)
        self.log.info("Lock %s: %s", lock.url, taken)
        urls = [self.metadata_urls] if isinstance(self.metadata_urls, str) else list(self.metadata_urls)
        numbers = fetch_metadata(urls, self.layout.raw)
        self.log.info("Fetched %d files, kept %d already fetched", numbers["files_fetched"], numbers["files_skipped"])
        return numbers
