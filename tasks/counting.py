"""The worker's own counters (hub.worker_metrics): starts, pool processes, failures.

Layer: tasks; imports the `hub` core, `tasks.application` and `tasks.db`. A
module of its own so that the app module need not import the database module,
which reads the app's settings (no import circle).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import task_failure, task_retry, worker_process_init, worker_ready

from hub import worker_metrics
from tasks.application import worker_name
from tasks.db import engine

log = logging.getLogger(__name__)


def count_event(name: str) -> None:
    """Add one to this worker's counter `name` (hub.worker_metrics), best effort."""
    # Best effort: a counter must never fail a task or a worker's start.
    try:
        worker_metrics.add(engine(), worker_name(), {name: 1})
    except Exception:  # boundary: the database may be away; the task's own error says so
        log.debug("could not count %s", name, exc_info=True)


@worker_ready.connect
def _count_start(**_: Any) -> None:
    count_event(worker_metrics.WORKER_STARTS)


@worker_process_init.connect
def _count_process_start(**_: Any) -> None:
    count_event(worker_metrics.POOL_PROCESS_STARTS)


@task_retry.connect
def _count_retry(**_: Any) -> None:
    count_event(worker_metrics.TASK_FAILURES)


@task_failure.connect
def _count_failure(**_: Any) -> None:
    count_event(worker_metrics.TASK_FAILURES)
