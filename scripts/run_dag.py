"""Run ``laion_pipeline`` once in this process (``dag.test``) with a JSON conf.

    python scripts/run_dag.py CONF.json [--log-dir DIR]

Prints a line per stage and progress; the full logs (Airflow's, Spark's, img2dataset's)
go to DIR/<date>-<time>.log (DIR: data/logs/), whose path is printed first and last. Exits
0 when the run succeeded, 1 when it failed. Rerunning with the same conf continues the
same dataset under the same output_root: finished stages and shards are skipped.

SIGTERM or SIGINT (Ctrl-C) stops the run and marks it failed before the process exits. A
run whose process died without a word (SIGKILL, a reboot) is marked failed by the next
start here or by ``make up`` (:func:`fail_stale_runs`): ``dag.test`` tasks have no
heartbeat for the scheduler to reap, and such a run would hold the DAG (one active run)
for good. See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from progress import Console, hookimpl, new_log_file, report_failure, run_logged, task_label, watching_stages

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "data" / "logs"
# The conf key under which a run started here names the process that runs it.
OWNER_KEY = "launched_by"
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
GRACE_SECONDS = 10.0  # for a stopped run's child processes to end on SIGTERM before SIGKILL


def migrate_db() -> None:
    """Create or upgrade the Airflow metadata database (its output goes where fd 1 and 2 go)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True)


def run_pipeline(conf: dict[str, Any], dag_id: str = "laion_pipeline") -> Any:
    """Trigger one run of ``dag_id`` with ``conf`` and return its DagRun.

    The run's conf also names this process (``launched_by``: host, pid, the pid's start
    time), so that another process can tell whether the run still has one behind it.
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id).test(run_conf={**conf, OWNER_KEY: this_process()})


def run_watched(conf: dict[str, Any], console: Console, every: float) -> bool:
    """:func:`run_pipeline` with a line per stage and progress every ``every`` seconds; True on success.

    Runs left behind by dead processes are marked failed first. SIGTERM or SIGINT stops
    the run: its child processes are stopped, the run is marked failed, and False returned.
    """
    from airflow.sdk.exceptions import AirflowTaskTerminated

    for line in fail_stale_runs():
        console.line(line)
    with ending_on_signals() as ending, watching_stages(console, every) as listener:
        try:
            dag_run = run_pipeline(conf)
        except AirflowTaskTerminated:
            if ending.received is None:
                raise
            ending.done = True  # a second Ctrl-C must not cut the clean-up short
            stop_children()
            failed = fail_own_runs(f"Stopped by {ending.received.name} sent to {who(this_process())}.")
            console.line(f"{ending.received.name} received: run {', '.join(failed) or '(none created yet)'} marked failed")
            return False
        ending.done = True
    if str(dag_run.state).endswith("success"):
        console.line(f"run {dag_run.run_id} succeeded")
        return True
    report_failure(console, listener, f"run {dag_run.run_id}")
    return False


# --- whose run is it: runs left behind by dead processes -----------------------------------


def this_process() -> dict[str, Any]:
    """This process as a run's conf records it; the start time tells a reused pid apart."""
    import psutil

    return {
        "command": Path(sys.argv[0]).name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started_at": psutil.Process().create_time(),
    }


def who(owner: dict[str, Any]) -> str:
    """``run_dag.py (pid 4242 on host-a)``."""
    return f"{owner.get('command') or 'a process'} (pid {owner['pid']} on {owner['host']})"


def owner_state(owner: Any) -> str:
    """``alive``, ``gone``, ``elsewhere`` (another host, whose processes cannot be seen from
    here) or ``unknown`` (no owner recorded) for a run's ``launched_by``."""
    import psutil

    if not isinstance(owner, dict) or not {"host", "pid", "pid_started_at"} <= owner.keys():
        return "unknown"
    if owner["host"] != socket.gethostname():
        return "elsewhere"
    try:
        process = psutil.Process(int(owner["pid"]))
        same = abs(process.create_time() - float(owner["pid_started_at"])) < 1.0
        return "alive" if same and process.status() != psutil.STATUS_ZOMBIE else "gone"
    except psutil.NoSuchProcess:
        return "gone"


def _unfinished_test_runs(session: Any) -> list[Any]:
    """Running or queued runs that ``dag.test`` created and nobody cleared since.

    A cleared run is the scheduler's now, whoever created it.
    """
    from airflow.models.dagrun import DagRun
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select

    return list(
        session.scalars(
            select(DagRun).where(
                DagRun.triggered_by == DagRunTriggeredByType.TEST,
                DagRun.state.in_((DagRunState.RUNNING, DagRunState.QUEUED)),
                DagRun.clear_number == 0,
            )
        )
    )


def fail_run(dag_run: Any, note: str, session: Any) -> list[str]:
    """Mark ``dag_run`` and its unfinished task instances failed, ``note`` on the run; the tasks' labels."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import DagRunState, State, TaskInstanceState
    from sqlalchemy import or_, select

    unfinished = [s for s in State.unfinished if s is not None]
    tis = session.scalars(
        select(TaskInstance).where(
            TaskInstance.dag_id == dag_run.dag_id,
            TaskInstance.run_id == dag_run.run_id,
            or_(TaskInstance.state.is_(None), TaskInstance.state.in_(unfinished)),
        )
    ).all()
    for ti in tis:
        ti.set_state(TaskInstanceState.FAILED, session=session)
    dag_run.set_state(DagRunState.FAILED)
    dag_run.note = note  # shown in the UI beside the run
    return [task_label(ti.task_id, ti.map_index) for ti in tis]


def fail_stale_runs() -> list[str]:
    """Mark failed the runs started here whose process is gone; a line for each unfinished ``dag.test`` run.

    Runs of a live process, runs started on another host and runs without ``launched_by``
    (``airflow dags test``, bench/) are left as they are: nothing here can tell whether
    they still run.
    """
    from airflow.utils.session import create_session

    lines = []
    me = who(this_process())
    with create_session() as session:
        for dag_run in _unfinished_test_runs(session):
            owner = (dag_run.conf or {}).get(OWNER_KEY)
            name, state = f"run {dag_run.run_id} of {dag_run.dag_id}", owner_state(owner)
            if state == "gone":
                left = f"left {dag_run.state} by {who(owner)}, which is gone"
                tasks = fail_run(dag_run, f"Marked failed by {me}: it was {left}.", session)
                lines.append(f"{name} was {left}: marked failed, and its unfinished tasks {', '.join(tasks) or '(none)'}")
            elif state == "alive":
                lines.append(f"{name} is being run by {who(owner)}: left as it is")
            else:
                why = f"was started on host {owner['host']}" if state == "elsewhere" else f"has no {OWNER_KEY} in its conf"
                lines.append(f"{name} {why}: left as it is; if nothing runs it any more, mark it failed (docs/operations.md)")
    return lines


def fail_own_runs(note: str) -> list[str]:
    """Mark failed the unfinished runs this process started; their run ids."""
    from airflow import settings
    from airflow.utils.session import create_session

    settings.Session.remove()  # dag.test's session, wherever the signal left it, holds no lock
    me = this_process()
    failed = []
    with create_session() as session:
        for dag_run in _unfinished_test_runs(session):
            owner = (dag_run.conf or {}).get(OWNER_KEY) or {}
            if owner_state(owner) == "alive" and (owner["host"], owner["pid"]) == (me["host"], me["pid"]):
                fail_run(dag_run, note, session)
                failed.append(dag_run.run_id)
    return failed


# --- SIGTERM and SIGINT -----------------------------------------------------------------------


class EndOnSignal:
    """Ends the run on SIGTERM or SIGINT, in a task or between tasks.

    The handler raises Airflow's ``AirflowTaskTerminated``, a BaseException: ``dag.test``
    lets it through (it catches Exception), and a task it lands in fails without a retry,
    as a task terminated from outside does; when such a task has ended, this listener
    raises it again. Airflow's task runner installs a SIGTERM handler of its own for each
    task (it calls the operator's ``on_kill``: spark-submit is stopped) and leaves it
    installed: the listener puts its handler back when a task starts, calling the task
    runner's too, and when a task ends.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.done = False  # the run is over: a signal no longer interrupts anything
        self._task_handler: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)
        if self._task_handler is not None:
            self._task_handler(signum, frame)
        self._end()

    def _end(self) -> None:
        if self.received is not None and not self.done:
            from airflow.sdk.exceptions import AirflowTaskTerminated

            raise AirflowTaskTerminated(f"stopped by {self.received.name}")

    def take_over(self, *, during_task: bool = False) -> None:
        previous = signal.getsignal(signal.SIGTERM)
        self._task_handler = previous if during_task and callable(previous) and previous != self._handle else None
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)
        self._end()

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        self.take_over(during_task=True)

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        self.take_over()

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        self.take_over()

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        self.take_over()


@contextmanager
def ending_on_signals() -> Iterator[EndOnSignal]:
    """SIGTERM and SIGINT end the run while inside (:class:`EndOnSignal`); the former handlers after."""
    from airflow.sdk.listener import get_listener_manager

    ending = EndOnSignal()
    previous = {signum: signal.getsignal(signum) for signum in EndOnSignal.SIGNALS}
    manager = get_listener_manager()
    # Registered before the stage lines' listener, so called after it: the console shows
    # the interrupted task's end before the run stops.
    manager.add_listener(ending)
    ending.take_over()
    try:
        yield ending
    finally:
        ending.done = True
        manager.pm.unregister(ending)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_children(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to every process this one started
    (spark-submit and its JVM, tool workers): a stopped run leaves nothing running."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace)


# --- the command ------------------------------------------------------------------------------


def read_conf(path: Path) -> dict[str, Any]:
    """The run conf in ``path``: a JSON object of params."""
    try:
        conf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read run conf {path}: {exc}") from None
    if not isinstance(conf, dict):
        kind = JSON_TYPES.get(type(conf), type(conf).__name__)
        raise ValueError(f"run conf {path} holds a JSON {kind}; it must be an object of params, e.g. {{\"metadata_urls\": [...]}}")
    return conf


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run_dag.py", description="Run laion_pipeline once in this process with a JSON conf.")
    parser.add_argument("conf", type=Path, help="the run's conf: a JSON object of laion_pipeline's params")
    parser.add_argument("--log-dir", type=Path, default=LOGS, help=f"where the run's full log goes (default: {LOGS})")
    args = parser.parse_args(argv[1:])
    try:
        conf = read_conf(args.conf)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    def run(console: Console) -> bool:
        logging.basicConfig(level=logging.INFO)
        migrate_db()
        return run_watched(conf, console, every=15)

    return run_logged("laion_pipeline", new_log_file(args.log_dir), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
