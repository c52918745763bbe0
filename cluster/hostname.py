"""A hostname callable for several Celery workers on one machine.

Airflow records `hostname_callable()` on each task instance. In containers every worker has
its own hostname, so the default is right; on one machine two workers share it, and
``AIRFLOW__CORE__HOSTNAME_CALLABLE=cluster.hostname.worker_name`` with a distinct
``LAION_WORKER_NAME`` per worker tells them apart.
"""

from __future__ import annotations

import os
import socket


def worker_name() -> str:
    return os.environ.get("LAION_WORKER_NAME") or socket.getfqdn()
