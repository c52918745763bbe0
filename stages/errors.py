"""Errors that no retry fixes.

A stage function raises one of these when running it again on the same input would fail
the same way: a bad setting, a malformed input file, an input an earlier stage left empty.
``operators.base.StageOperator`` fails such a task at once (Airflow's
``AirflowFailException``) instead of retrying it with back-off; any other exception is
retried as before.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Base of the errors that a retry cannot fix."""


class InputError(PermanentError, ValueError):
    """A setting or an input file the stage cannot use; the message names it and what is wrong."""


class NothingToDo(InputError):
    """The stage's input is empty: an earlier stage finished but left it nothing to work on."""


class StageNotFinished(PermanentError, FileNotFoundError):
    """An earlier stage's completion marker is missing: that stage has not finished there."""
