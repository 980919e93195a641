"""The in-hub worker of the embedded default, SIGKILLed mid-stream several times.

TCP (native) and MQTT (QoS 1) devices stream into one `hub run` with no
RabbitMQ; the hub's worker child is killed three times while it works, and the
supervisor starts a new one each time. Every acknowledged message must be
stored exactly once (lost 0, no duplicate row) and handled, and the local
queue must be empty once everything is processed: a handed-out message comes
back when its consumer dies, and an acknowledged one is deleted
(docs/delivery.md).

Handler runs are at least once: the one run a killed worker was in the middle
of may have done its work before the kill and runs again. So a scenario may
show up to one duplicated handler run per kill, never more: what the killed
worker held but had not started is not run twice, and the handler runs an
ingest task scheduled are committed with its acknowledgement, so a killed
ingest task that is redelivered schedules them once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubProcess,
    conclude,
    describe,
    measure_recovery,
    provision,
    read_stored,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

DEVICES_PER_TRANSPORT = 3
KILLS = 3


def _worker_pid(hub: HubProcess, not_pid: int | None, timeout: float = 90) -> int:
    """The hub's live worker child, other than `not_pid` (the supervisor's new one)."""
    found: list[int] = []

    def alive() -> bool:
        found[:] = [
            pid
            for pid in hub.children()
            if pid != not_pid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        return bool(found)

    assert wait_for(alive, timeout), f"no worker child:\n{hub.log_text()[-3000:]}"
    return found[0]


def _handled(database_url: str, device_ids: list[str]) -> int:
    return sum(read_stored(database_url, device_ids).handler_runs.values())


def _queue_rows(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / "queue.sqlite3")) as db:
        return int(db.execute("SELECT count(*) FROM queue_messages").fetchone()[0])


def test_in_hub_worker_sigkill_mid_stream_then_the_supervisors_new_worker(
    database_url: str,
    hubs: Callable[..., HubProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    provision(database_url, [])
    # Small batches and a handler run per message keep the worker busy, so a
    # kill lands in the middle of a task, holding messages it was handed.
    hub = hubs(database_url, broker_url=None, env={"HUB_BATCH_MAX_MESSAGES": "20"})
    tcp_ids = [f"rel-ewk-tcp-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    mqtt_ids = [f"rel-ewk-mqtt-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    credentials = provision(database_url, tcp_ids + mqtt_ids)
    fleet = fleets(
        FleetOptions(
            tcp_port=hub.options.tcp_port,
            mqtt_port=hub.options.mqtt_port,
            tcp={d: credentials[d] for d in tcp_ids},
            mqtt={d: credentials[d] for d in mqtt_ids},
            rate=5.0,
        )
    )
    assert fleet.wait_acks(200, 90), "the fleet was not acknowledged before the fault"
    killed: int | None = None
    for _ in range(KILLS):
        worker = _worker_pid(hub, killed)
        # Kill only once this worker is at work (it ran handlers since it started).
        handled = _handled(database_url, tcp_ids + mqtt_ids)
        assert wait_for(lambda n=handled: _handled(database_url, tcp_ids + mqtt_ids) > n, 90)
        os.kill(worker, signal.SIGKILL)
        killed = worker
        # The hub keeps acknowledging: the local queue holds what no worker runs.
        assert fleet.wait_acks(100, 60), "acknowledgements stopped while the worker was away"
    lifted = time.monotonic()
    _worker_pid(hub, killed)
    recovery = measure_recovery(fleet, database_url, lifted)
    fleet.wait_acks(200, 60)
    results = conclude(
        "in-hub worker SIGKILL x3 (embedded default)", fleet, database_url, recovery_s=recovery
    )
    for transport in ("tcp", "mqtt"):
        comparison = results[transport]
        assert comparison.acknowledged > 0, f"no {transport} device was acknowledged"
        assert comparison.lost == 0 and comparison.unprocessed == 0, describe(comparison)
    stored = read_stored(database_url, tcp_ids + mqtt_ids)
    assert all(rows == 1 for rows in stored.telemetry.values())
    rerun = sum(runs - 1 for runs in stored.handler_runs.values())
    assert rerun <= KILLS, f"{rerun} handler runs repeated after {KILLS} kills"
    assert "restarting it" in hub.log_text()
    # Everything processed was acknowledged, so deleted: the queue is empty
    # (presence messages of the stopped fleet included).
    data_dir = hub.options.data_dir
    assert wait_for(lambda: _queue_rows(data_dir) == 0, 90), _queue_rows(data_dir)
