"""The operator that writes the curated subset as webdataset (:mod:`stages.curate.export`)."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.exceptions import AirflowSkipException

from operators.base import StageOperator
from operators.fetch import run_is_active
from stages.curate.export import ExportSettings, export_subset
from stages.lock import RootLock


class ExportSubsetOperator(StageOperator):
    """Writes ``subset/``: the curation's kept samples, or those of the ``subset_keys``
    allowlist, as new tar shards with their parquet and stats; shards whose selection did
    not change are kept as they are.

    It holds the output root's lock while it works, so that no run changes the shards it
    reads: inside ``laion_pipeline`` its run holds the lock already (the report task gives
    it back); run on its own (``laion_export_subset``) it takes the lock and gives it back.

    :param enabled: whether to export at all (templated; ``laion_pipeline``'s ``export_subset``):
        when false the task is skipped
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "enabled")
    settings_class = ExportSettings
    lock_wait_seconds = 24 * 3600

    def __init__(self, *, enabled: bool | str = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.enabled = enabled

    def run(self, context: Any) -> dict[str, Any]:
        if str(self.enabled).lower() in ("false", "0", "none", ""):
            raise AirflowSkipException("export_subset is false: no subset written")
        settings = self.stage_settings()  # a bad setting fails before the lock is taken
        ti = context["ti"]
        lock = RootLock(str(self.output_root), {"dag_id": ti.dag_id, "run_id": ti.run_id})
        taken = lock.acquire(lambda holder: run_is_active(ti, holder), wait_seconds=self.lock_wait_seconds)
        try:
            numbers = export_subset(self.layout, settings)
        finally:
            if taken != "held" and lock.release():  # the run's own lock stays for its report task
                self.log.info("Gave back the lock of %s", self.output_root)
        self.log.info(
            "Subset: %d samples in %d shards, selected by %s (%d keys not found); %d shards written",
            numbers["samples"], numbers["shards"], numbers["selected_by"], numbers["keys_not_found"], numbers["shards_written"],
        )  # fmt: skip
        return numbers
