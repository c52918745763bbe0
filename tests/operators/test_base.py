"""StageOperator: an error no retry fixes fails the task at once; every failed try leaves
its reason for the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.base import FAILURE_KEY, MAX_REASON_CHARS, StageOperator
from stages.errors import InputError, NothingToDo, StageNotFinished
from stages.settings import setting


class PushedXComs:
    """Stands in for the task instance of a task run, which needs a scheduled DAG run: what
    the operator pushes is kept here. The heavy test tests/pipeline/test_failed_run.py runs
    the same path through Airflow."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


@dataclass(frozen=True)
class StepSettings:
    steps: int = setting(1, type="integer", minimum=1)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


class Stage(StageOperator):
    """Raises what it is given, or returns its settings."""

    settings_class = StepSettings

    def __init__(self, *, error: Exception | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error

    def run(self, context: Any) -> dict[str, Any]:
        settings = self.stage_settings()
        if self.error is not None:
            raise self.error
        return {"steps": settings.steps}


def stage(tmp_path: Path, **kwargs: Any) -> Stage:
    return Stage(task_id="stage", output_root=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    "error",
    [
        NothingToDo("nothing to embed: 0 of 48 downloaded: refused_private_address 48"),
        InputError("input file raw/x.csv has no URL column (columns: a, b)"),
        StageNotFinished("dedup/_stats.json does not exist: dedup has not finished there"),
    ],
)
def test_an_error_no_retry_fixes_fails_at_once_and_says_why(tmp_path: Path, error: Exception) -> None:
    ti = PushedXComs()
    with pytest.raises(AirflowFailException, match="not retried") as failed:
        stage(tmp_path, error=error).execute(context={"ti": ti})
    assert str(error) in str(failed.value) and failed.value.__cause__ is error
    assert ti.pushed == {FAILURE_KEY: {"reason": str(error)}}


def test_any_other_error_is_left_to_the_retries(tmp_path: Path) -> None:
    ti = PushedXComs()
    error = ConnectionResetError("the store hung up")
    with pytest.raises(ConnectionResetError) as failed:
        stage(tmp_path, error=error).execute(context={"ti": ti})
    assert failed.value is error
    assert ti.pushed == {FAILURE_KEY: {"reason": "ConnectionResetError: the store hung up"}}


def test_a_long_reason_is_cut(tmp_path: Path) -> None:
    ti = PushedXComs()
    with pytest.raises(RuntimeError):
        stage(tmp_path, error=RuntimeError("spark said " + "x" * 5000)).execute(context={"ti": ti})
    reason = ti.pushed[FAILURE_KEY]["reason"]
    assert len(reason) == MAX_REASON_CHARS and reason.startswith("RuntimeError: spark said x") and reason.endswith("…")


@pytest.mark.parametrize(
    ("value", "said"),
    [("many", "setting steps = 'many': expected int"), (0, "steps must be at least 1, got 0")],
)
def test_a_bad_setting_fails_at_once_naming_it(tmp_path: Path, value: Any, said: str) -> None:
    with pytest.raises(AirflowFailException, match="not retried") as failed:
        stage(tmp_path, settings={"steps": value}).execute(context={})
    assert f"stage: bad setting: {said}" in str(failed.value)


def test_a_stage_that_works_returns_its_numbers_and_records_nothing(tmp_path: Path) -> None:
    ti = PushedXComs()
    numbers = stage(tmp_path, settings={"steps": "3"}).execute(context={"ti": ti})
    assert numbers["steps"] == 3 and {"started_at", "ended_at", "seconds"} <= set(numbers)
    assert ti.pushed == {}
