"""What a pipeline run shows in its terminal: a line per stage, progress, and where the log is.

Everything else the run writes (Airflow's task logs, Spark's, img2dataset's) goes to a log
file. The redirection is of file descriptors 1 and 2, not of ``sys.stdout``, because
spark-submit, the JVM and img2dataset's workers are child processes writing to them directly.

Stage lines come from an Airflow listener: ``dag.test`` runs each task in this process,
and the task runner calls the listeners with the task instance, whose XCom return value
is the stage's numbers (:class:`operators.base.StageOperator`). Progress lines come from a
thread that counts finished work in the output folder, the same files that make reruns
resume (shard stats, finished embedding partitions).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from pluggy import HookimplMarker

# Airflow's listener marker (airflow.listeners.hookimpl), made here so that importing this
# module does not import Airflow before the output is redirected: Airflow picks colours
# for its logs when it is imported, by whether stdout is a terminal.
hookimpl = HookimplMarker("airflow")
TAIL_LINES = 30
LONGEST_TAIL_LINE = 500  # characters; Airflow's lines can hold a whole task instance


def new_log_file(folder: Path) -> Path:
    """``folder/<date>-<time>.log``, its folder created."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{datetime.now():%Y%m%d-%H%M%S}.log"


class Console:
    """The terminal while fds 1 and 2 go to ``log_path``: timestamped lines, also written to the log."""

    def __init__(self, stream: TextIO, log_path: Path) -> None:
        self.stream, self.log_path = stream, log_path
        self._lock = threading.Lock()  # the progress thread and the tasks both write

    def line(self, text: str) -> None:
        stamped = f"{datetime.now():%H:%M:%S} {text}\n"
        with self._lock:
            self.stream.write(stamped)
            self.stream.flush()
            os.write(1, stamped.encode())  # fd 1 is the log file here


@contextmanager
def output_to(log_path: Path) -> Iterator[Console]:
    """Point fds 1 and 2 at ``log_path`` (appending); yield a :class:`Console` on the former fd 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    # Python's stdout is block-buffered when not a terminal: line by line, its lines land in
    # the log in the order they were written relative to stderr's and the children's.
    line_buffered = getattr(sys.stdout, "line_buffering", None)
    if line_buffered is False:
        sys.stdout.reconfigure(line_buffering=True)
    try:
        yield Console(terminal, log_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if line_buffered is False:
            sys.stdout.reconfigure(line_buffering=False)
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        terminal.close()


def tail(log_path: Path, lines: int = TAIL_LINES, end: int | None = None) -> list[str]:
    """The last ``lines`` lines of the log's first ``end`` bytes (of the whole log by default)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "rb") as log:
        end = log.seek(0, os.SEEK_END) if end is None else end
        start = max(0, end - 1024 * lines)  # enough for long lines, without reading a log of hours
        log.seek(start)
        text = log.read(end - start).decode(errors="replace")
    return text.splitlines()[-lines:]


def run_logged(what: str, log_path: Path, body: Callable[[Console], bool]) -> int:
    """Run ``body`` with the process's output in ``log_path``; 0 when it returns True, else 1.

    The log's path is printed first and last. An exception's traceback goes to the log and
    its last lines to the terminal.
    """
    print(f"{what}: full log in {log_path}", flush=True)
    with output_to(log_path) as console:
        try:
            ok = body(console)
        except Exception:
            traceback.print_exc()
            report_failure(console, None, what)
            ok = False
        console.line(f"{what} {'succeeded' if ok else 'failed'}; full log: {log_path}")
    return 0 if ok else 1


# --- stage lines ----------------------------------------------------------------------------


def task_label(task_id: str, map_index: int = -1, rendered_map_index: str | None = None) -> str:
    """``dedup``; ``download_images[part-00001]`` for a mapped task."""
    if map_index is None or map_index < 0:
        return task_id
    return f"{task_id}[{rendered_map_index or map_index}]"


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"


def _indexes(n: dict[str, Any]) -> str:
    return ", ".join(f"{k} {n[k]['index_key']} ({n[k]['ntotal']} vectors, recall@10 {n[k]['recall_at_10']})" for k in ("image", "text"))


def _dedup(n: dict[str, Any]) -> str:
    batch = n.get("added_batch")
    if batch is None and "batches" in n:
        return f"no new raw file: {n['rows_out']} unique pairs in {n['batches']} batches"
    line = f"{n['rows_in']} rows in, {n['rows_invalid']} invalid, {n['rows_out']} unique"
    if batch and n.get("batches", 1) > 1:
        line = (
            f"batch {batch['batch']}: {batch['rows_in']} rows in, {batch['rows_out']} new unique, "
            f"{batch['duplicates_of_earlier_batches']} already in the dataset; {n['rows_out']} unique in all"
        )
    return line


# What each stage's XCom return value says in one line.
DESCRIBE: dict[str, Callable[[Any], str]] = {
    "fetch_metadata": lambda n: f"{n['files_fetched']} files fetched ({_size(n['bytes'])}), {n['files_skipped']} already there",
    "dedup": lambda n: _dedup(n),
    "list_dedup_parts": lambda parts: f"{len(parts)} parts to download",
    "download_images": lambda n: (
        f"{n['successes']}/{n['count']} downloaded, {n['failed_to_download']} failed to download, "
        f"{n['failed_to_resize']} to resize"
    ),
    "clip_embeddings": lambda n: f"{n['count']} image and {n['text_count']} text embeddings of dim {n['dim']} on {n['device']}",
    "build_index": _indexes,
    "report": lambda n: str(n["report_html"]),
}
NOT_NUMBERS = ("started_at", "ended_at", "seconds")


def describe(task_id: str, value: Any) -> str:
    """One line of a stage's numbers; a stage without a describer (or a changed one) lists its scalars."""
    try:
        text = DESCRIBE[task_id](value)
    except (KeyError, TypeError):
        if not isinstance(value, dict):
            return repr(value)[:200]
        text = ", ".join(f"{k} {v}" for k, v in value.items() if k not in NOT_NUMBERS and isinstance(v, (int, float, str)))
    if isinstance(value, dict) and value.get("skipped"):
        text += " (unchanged inputs: skipped)"
    return text


def done_line(label: str, task_id: str, value: Any, elapsed: float) -> str:
    """``dedup done in 21.3 s: 165 rows in, 10 invalid, 155 unique``."""
    seconds = value.get("seconds", elapsed) if isinstance(value, dict) else elapsed
    return f"{label} done in {seconds:.1f} s: {describe(task_id, value)}"


# --- progress -------------------------------------------------------------------------------


class DownloadProgress:
    """Samples of one part in finished shards (their ``*_stats.json``) of the part's rows."""

    unit = "samples"

    def __init__(self, output_root: str, part: str) -> None:
        from stages.layout import RunLayout

        self.layout, self.part = RunLayout(output_root), part
        self._total: int | None = None
        self._counted: dict[str, int] = {}  # a shard's stats never change once written

    def __call__(self) -> tuple[int, int] | None:
        import pyarrow.parquet as pq

        if self._total is None:
            self._total = pq.read_metadata(self.layout.part(self.part)).num_rows
        for stats in self.layout.shard_stats([self.part]):
            if stats not in self._counted:
                self._counted[stats] = int(json.loads(Path(stats).read_text()).get("count", 0))
        # Capped: shards of an earlier retry of failed samples count some rows twice.
        return min(sum(self._counted.values()), self._total), self._total


class EmbeddingsProgress:
    """Finished partitions (``embeddings/_done/<name>``) of one part's plan (``embeddings/_plans/<part>.json``)."""

    unit = "partitions"

    def __init__(self, output_root: str, part: str) -> None:
        from stages.layout import RunLayout

        self.folder = RunLayout(output_root).embeddings
        self.part = part

    def __call__(self) -> tuple[int, int] | None:
        from stages.embedding_plans import PLANS, finished_partitions

        plan = Path(self.folder, PLANS, f"{self.part}.json")
        if not plan.exists():
            return None  # not planned yet
        planned = {p["name"] for p in json.loads(plan.read_text())["partitions"]}
        return len(finished_partitions(self.folder) & planned), len(planned)


# The long stages, and what counts their finished work: (output_root, task) -> measure.
PROGRESS: dict[str, Callable[[str, Any], DownloadProgress | EmbeddingsProgress]] = {
    "download_images": lambda root, task: DownloadProgress(root, str(task.part)),
    "clip_embeddings": lambda root, task: EmbeddingsProgress(root, str(task.part)),
}


def progress_of(task: Any) -> DownloadProgress | EmbeddingsProgress | None:
    """What measures a running task's progress; None for short stages and remote output roots."""
    from stages import storage

    root = getattr(task, "output_root", None)
    if task.task_id not in PROGRESS or not isinstance(root, str) or storage.is_remote(root):
        return None
    return PROGRESS[task.task_id](root, task)


class ProgressPoller:
    """Every ``every`` seconds, a line for each running task whose count changed."""

    def __init__(self, console: Console, every: float) -> None:
        self.console, self.every = console, every
        self.running: dict[str, DownloadProgress | EmbeddingsProgress] = {}
        self._shown: dict[str, tuple[int, int]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="progress", daemon=True)

    def watch(self, label: str, measure: DownloadProgress | EmbeddingsProgress | None) -> None:
        if measure is not None:
            self.running[label] = measure

    def forget(self, label: str) -> None:
        self.running.pop(label, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stopped.wait(self.every):
            for label, measure in list(self.running.items()):
                try:
                    count = measure()
                except (OSError, ValueError):
                    continue  # a file still being written: the next round reads it whole
                if count is None or label not in self.running:
                    continue  # not planned yet, or finished meanwhile
                if count == self._shown.get(label, (0, count[1])):
                    continue  # unchanged; nothing done yet is no news either
                self._shown[label] = count
                done, total = count
                self.console.line(f"{label}: {done}/{total} {measure.unit} ({100 * done // max(total, 1)}%)")


# --- the listener ---------------------------------------------------------------------------


class StageListener:
    """Prints each task's start and end; remembers the tasks that failed for good, and where the log was."""

    def __init__(self, console: Console, poller: ProgressPoller) -> None:
        self.console, self.poller = console, poller
        self.failed: list[str] = []
        self.log_size_at_failure: int | None = None

    @staticmethod
    def _label(ti: Any) -> str:
        return task_label(ti.task_id, ti.map_index, getattr(ti, "rendered_map_index", None))

    @staticmethod
    def _elapsed(ti: Any) -> float:
        return time.time() - ti.start_date.timestamp() if getattr(ti, "start_date", None) else 0.0

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        label = self._label(task_instance)
        self.console.line(f"{label} started")
        self.poller.watch(label, progress_of(task_instance.task))

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        label = self._label(task_instance)
        self.poller.forget(label)
        value = task_instance.xcom_pull(task_ids=task_instance.task_id, map_indexes=task_instance.map_index)
        self.console.line(done_line(label, task_instance.task_id, value, self._elapsed(task_instance)))

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        label = self._label(task_instance)
        self.poller.forget(label)
        self.console.line(f"{label} skipped after {self._elapsed(task_instance):.1f} s")

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        label = self._label(task_instance)
        self.poller.forget(label)
        retry = task_instance.state == "up_for_retry"  # a str enum, also when it is not the last try
        if not retry:
            self.failed.append(label)
            if self.log_size_at_failure is None:  # the first failure's traceback ends here
                sys.stdout.flush()
                sys.stderr.flush()
                self.log_size_at_failure = self.console.log_path.stat().st_size
        reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        first_line = (reason.strip().splitlines() or ["no error message"])[0][:200]
        attempt = f"try {task_instance.try_number} of {task_instance.max_tries + 1}{', will retry' if retry else ''}"
        self.console.line(f"{label} failed after {self._elapsed(task_instance):.1f} s ({attempt}): {first_line}")


@contextmanager
def watching_stages(console: Console, every: float = 5.0) -> Iterator[StageListener]:
    """Stage and progress lines for the tasks that run in this process while inside."""
    from airflow.sdk.listener import get_listener_manager

    poller = ProgressPoller(console, every)
    listener = StageListener(console, poller)
    manager = get_listener_manager()
    manager.add_listener(listener)
    poller.start()
    try:
        yield listener
    finally:
        poller.stop()
        manager.pm.unregister(listener)


def report_failure(console: Console, listener: StageListener | None, what: str) -> None:
    """Which task failed, and the log's last lines up to its failure (up to the end when no task failed)."""
    if listener and listener.failed:
        headline, end = f"{what} failed in {', '.join(listener.failed)}; the log up to the failure:", listener.log_size_at_failure
    else:
        headline, end = f"{what} failed; the log's last lines:", None
    lines = tail(console.log_path, TAIL_LINES, end)
    console.line(headline)
    for line in lines:
        console.stream.write(f"  | {line[:LONGEST_TAIL_LINE]}\n")
    console.stream.flush()
