"""Reads the workers' counters from the database into the hub's metrics, now and then.

Layer: bridges; imports the `hub` core only.

Workers count in the database (hub.worker_metrics explains why); this loop
copies the sums, and the dead letters by status, into `Metrics.worker_counts`
every few seconds, in a thread, so that `/metrics` and `/status` show them
without ever waiting on the database on the event loop.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import Engine

from hub import dead_letters, worker_metrics
from hub.metrics import Metrics

log = logging.getLogger(__name__)

INTERVAL_S = 5.0


def read_once(engine: Engine, metrics: Metrics) -> None:
    """One reading (blocking: call it in a thread)."""
    metrics.worker_counts.update(
        worker_metrics.totals(engine), dead_letters.count_dead_letters(engine)
    )


async def poll(engine: Engine, metrics: Metrics, interval_s: float = INTERVAL_S) -> None:
    """Read every `interval_s` until cancelled; a failed reading is logged and retried."""
    while True:
        try:
            await asyncio.to_thread(read_once, engine, metrics)
        except Exception:  # boundary: the database may be away for a while
            log.warning("could not read the workers' counters", exc_info=True)
        await asyncio.sleep(interval_s)
