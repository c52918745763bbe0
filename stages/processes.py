"""Worker processes started by the tools inside an Airflow task.

img2dataset and clip-retrieval start worker processes with multiprocessing's "spawn"
method. A spawned child first re-imports the parent's ``__main__``; inside an Airflow
task that is Airflow's own entry point, and importing Airflow in the child fails: Airflow 3
gives task processes an invalid metadata-database URL (``airflow-db-not-allowed:///``) so
that tasks cannot reach the database, and ``import airflow`` parses that URL. The workers
die at start and the tool waits for them for ever.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def spawn_without_main() -> Iterator[None]:
    """Within the block, spawned processes start without re-importing ``__main__``.

    The tools' workers need only what they unpickle (their own modules and ours), never
    the parent's entry point.
    """
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved
