"""The periodic upkeep, run by the workers: partitions ahead, retention, stale commands.

Layer: tasks; imports the `hub` core only.

Every worker process (`celery -A tasks worker`, and the in-hub worker of
`hub run`) starts one thread when it is ready (Celery's `worker_ready`). The
thread wakes every `tick_s` and tries to claim the upkeep lease
(hub/upkeep.py, `claim_lease`): one process of the whole fleet wins it per
`maintenance_interval_s` and does the round; the others go back to sleep.
So the work runs once per interval however many workers and hubs run, with
no scheduler process to deploy and nothing to keep single (Celery beat must
run exactly once). Hubs never run it: they are not workers. A round that fails
(the database away) is logged, and the next claim after the interval tries
again; every step is idempotent.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.signals import worker_ready, worker_shutdown

import tasks.application
from hub.settings import Settings
from hub.upkeep import UPKEEP_LEASE, Retention, UpkeepReport, claim_lease, run_upkeep
from tasks.commands import sweep_expired
from tasks.db import engine

log = logging.getLogger(__name__)


def retention_of(settings: Settings) -> Retention:
    return Retention(
        telemetry_days=settings.telemetry_retention_days,
        handler_runs_days=settings.handler_runs_retention_days,
        commands_days=settings.commands_retention_days,
    )


def upkeep_round(holder: str, now: datetime | None = None) -> UpkeepReport | None:
    """Claim the lease and, if this process won it, do one round; None if another had it."""
    settings = tasks.application.context().settings
    now = now or datetime.now(UTC)
    interval = timedelta(seconds=settings.maintenance_interval_s)
    if not claim_lease(engine(), UPKEEP_LEASE, interval, holder, now):
        return None
    report = run_upkeep(engine(), retention_of(settings), now)
    report.rows_deleted["expired_commands"] = sweep_expired(now)
    return report


class UpkeepThread(threading.Thread):
    """Tries `upkeep_round` at start, then every `tick_s`, until `stop()`."""

    def __init__(self, holder: str, tick_s: float) -> None:
        super().__init__(name="hub-upkeep", daemon=True)
        self.holder = holder
        self.tick_s = tick_s
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                report = upkeep_round(self.holder)
            except Exception:  # boundary: one round; the next claim tries again
                log.exception("the periodic upkeep failed; it is tried again later")
            else:
                if report is not None:
                    log.info(
                        "upkeep: partitions created %s, dropped %s, rows deleted %s",
                        report.partitions_created,
                        report.partitions_dropped,
                        report.rows_deleted,
                    )
            if self._stopping.wait(self.tick_s):
                return

    def stop(self) -> None:
        self._stopping.set()


_thread: UpkeepThread | None = None


@worker_ready.connect
def _start(**_: Any) -> None:
    global _thread
    settings = tasks.application.context().settings
    # Claims are cheap; waking a tenth of the interval keeps a round at most
    # that late after the process that ran the last one stopped.
    tick_s = min(60.0, settings.maintenance_interval_s / 10)
    _thread = UpkeepThread(f"{tasks.application.worker_name()}/{os.getpid()}", tick_s)
    _thread.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _thread is not None:
        _thread.stop()
