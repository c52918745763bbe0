"""The shared part of every pipeline operator: storage set-up, timing, numbers, metrics, failures."""

from __future__ import annotations

import time
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from stages import storage
from stages.errors import InputError, PermanentError
from stages.layout import RunLayout
from stages.settings import settings_from

METRIC_PREFIX = "laion_pipeline"
FAILURE_KEY = "failure"  # the XCom where a failed try leaves its reason for the report
MAX_REASON_CHARS = 1000  # a Spark failure carries its log tail: the report keeps the start


class StageOperator(BaseOperator):
    """Runs one stage's plain-Python function and publishes its numbers.

    Subclasses implement :meth:`run`, which returns a dict of the stage's numbers. That
    dict, plus ``started_at``/``ended_at``/``seconds``, becomes the task's XCom return
    value (shown in the UI's XCom tab) and each number is emitted as a StatsD/OpenTelemetry
    gauge ``laion_pipeline.<task_id>.<key>`` through Airflow's own metrics.

    A failed try leaves its reason in the XCom ``failure`` for the report. An error that
    no retry fixes (:class:`stages.errors.PermanentError`: a bad setting, a malformed
    input, nothing to do) fails the task at once, without the retries and their back-off.

    A stage with settings names its dataclass in ``settings_class``; the operator takes
    their values as ``settings`` (usually ``operators.params.templates_of(settings_class)``)
    and :meth:`stage_settings` builds the dataclass, defaults filled in.

    An operator that works through another operator class lists StageOperator first among
    its bases (``DedupOperator(StageOperator, SparkSubmitOperator)``): ``execute`` is this
    one, and its :meth:`run` calls the other class's ``execute``.

    :param output_root: where the run's artifacts live, a local path or s3://... (templated)
    :param storage_conn_id: Airflow connection with the store's credentials (templated)
    :param settings: the stage's settings by field name (templated)
    """

    template_fields: Sequence[str] = ("output_root", "storage_conn_id", "settings")
    settings_class: type | None = None

    def __init__(
        self, *, output_root: str, storage_conn_id: str | None = None, settings: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.output_root = output_root
        self.storage_conn_id = storage_conn_id
        self.settings = settings or {}

    @property
    def layout(self) -> RunLayout:
        return RunLayout(str(self.output_root))

    def stage_settings(self) -> Any:
        """The settings dataclass from the rendered ``settings``; a bad value is an :class:`InputError`."""
        if self.settings_class is None:
            raise TypeError(f"{type(self).__name__} has no settings_class")
        try:
            return settings_from(self.settings_class, self.settings)
        except (TypeError, ValueError) as error:
            raise InputError(f"{self.task_id}: bad setting: {error}") from error

    def run(self, context: Any) -> dict[str, Any]:
        raise NotImplementedError

    def execute(self, context: Any) -> dict[str, Any]:
        try:
            storage.configure_storage(str(self.output_root), self.storage_conn_id)
            started = time.time()
            numbers = self.run(context)
        except AirflowSkipException:
            raise
        except Exception as error:
            self.record_failure(context, error)
            if isinstance(error, PermanentError):
                raise AirflowFailException(f"{error} (not retried: the same input fails the same way)") from error
            raise
        numbers = timed(started, time.time(), numbers)
        emit_stage_metrics(self.task_id, numbers)
        return numbers

    def record_failure(self, context: Any, error: BaseException) -> None:
        """Leave the reason of a failed try in the task's ``failure`` XCom, for the report.

        The next try starts by clearing the task's XComs, so only a task that ended failed
        keeps one. Outside a task run (no ``ti`` in the context) there is nowhere to leave it.
        """
        ti = context.get("ti") if isinstance(context, dict) else None
        if ti is None:
            return
        try:
            ti.xcom_push(key=FAILURE_KEY, value={"reason": failure_reason(error)})
        except Exception:  # the task's own error is the one raised; this one is only logged
            self.log.warning("Could not record the failure of %s for the report", self.task_id, exc_info=True)


def failure_reason(error: BaseException) -> str:
    """What the report says of a failed try: the message of an expected error, else its type too."""
    reason = str(error) if isinstance(error, PermanentError) else f"{type(error).__name__}: {error}"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


def timed(started: float, ended: float, numbers: dict[str, Any]) -> dict[str, Any]:
    return {**numbers, "started_at": started, "ended_at": ended, "seconds": round(ended - started, 3)}


def emit_stage_metrics(task_id: str, numbers: dict[str, Any]) -> None:
    """Every number of a stage as a gauge, and its duration as a timer, via Airflow's Stats."""
    from airflow.stats import Stats

    for key, value in numbers.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("started_at", "ended_at"):
            Stats.gauge(f"{METRIC_PREFIX}.{task_id}.{key}", value)
    Stats.timing(f"{METRIC_PREFIX}.{task_id}.duration", numbers["seconds"] * 1000)
