from __future__ import annotations

from typing import Any, Sequence

from operators.base import StageOperator
from operators.fetch import run_is_active
from stages.lock import RootLock
from stages.remove_batch import remove_batch


class RemoveBatchOperator(StageOperator):
    """Takes one batch out of the dataset at ``output_root`` (:mod:`stages.remove_batch`),
    holding the root's lock as a pipeline run does (the report task gives it back).

    :param batch: the batch's number, as the report and ``dedup/_stats.json`` name it (templated)
    """

    template_fields: Sequence[str] = (*StageOperator.template_fields, "batch")
    lock_wait_seconds = 24 * 3600

    def __init__(self, *, batch: int | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch = batch

    def run(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        lock = RootLock(str(self.output_root), {"dag_id": ti.dag_id, "run_id": ti.run_id})
        lock.acquire(lambda holder: run_is_active(ti, holder), wait_seconds=self.lock_wait_seconds)
        numbers = remove_batch(self.layout, int(self.batch))
        self.log.info("Removed batch %d: %d rows in %d parts; %d rows remain", numbers["batch"], numbers["rows_removed"], numbers["parts_removed"], numbers["rows_out"])
        return numbers
