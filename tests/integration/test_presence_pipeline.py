"""Presence through the real pipeline: RabbitMQ, worker processes, the CLI.

The reported defect: `hub state` showed a disconnected device as online while
`hub status` counted 0 connected, because the device's telemetry batch was
stored after its disconnect (telemetry and presence travel on separate
queues, so any worker may store them in either order). Here one worker
stores the presence queue first, another the telemetry queue afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub.protocol.events import Ack
from hub.registry import Registry
from hub.settings import Settings
from hub.storage import device_state, make_engine, migrate
from tasks.worker import celery_worker_command, worker_environment
from tests.support.processes import ROOT, HubThread, make_test_settings, settings_env, wait_until
from tests.support.raw_device import RawDevice
from tests.support.services import amqp_url, create_vhost, delete_vhost

pytestmark = pytest.mark.integration


@pytest.fixture
def own_vhost() -> Iterator[str]:
    # Its own vhost: no other test's worker may take these queues.
    vhost = create_vhost()
    try:
        yield vhost
    finally:
        delete_vhost(vhost)


class QueueWorker:
    """`celery -A tasks worker -Q <queue>`: a real worker for one queue only."""

    def __init__(self, settings: Settings, queue: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            celery_worker_command(
                queues=[queue],
                pool="solo",
                loglevel="INFO",
                heartbeat=False,
                hostname=f"{queue}-{time.monotonic_ns()}@%h",
            ),
            cwd=ROOT,
            env=worker_environment(settings, python_path=[str(ROOT), str(ROOT / "firmware-sim")]),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        ready = wait_until(lambda: b" ready." in log_path.read_bytes(), timeout=90)
        assert ready, log_path.read_text()[-3000:]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def test_telemetry_stored_after_the_disconnect_leaves_the_device_offline(
    tmp_path: Path, own_vhost: str
) -> None:
    database_url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(database_url)
    engine: Engine = make_engine(database_url)
    settings = make_test_settings(
        tmp_path / "hub", broker_url=amqp_url(own_vhost), database_url=database_url
    )
    credential = Registry(engine).add("walker-1")
    hub = HubThread(settings)
    workers: list[QueueWorker] = []
    try:
        device = RawDevice(hub.tcp_port)
        assert device.hello("walker-1", credential) == Ack(0)
        device.telemetry(1, {"t": 21.5})
        assert device.acks_until(1) == {1}  # durable in hub.telemetry, not stored yet
        device.close()
        assert wait_until(lambda: hub.call_soon(lambda: len(hub.app.tcp_servers[0].devices)) == 0)

        workers.append(QueueWorker(settings, "hub.presence", tmp_path / "presence.log"))
        assert wait_until(
            lambda: (row := device_state(engine, "walker-1")) is not None and not row["online"]
        ), "the disconnect was not stored"
        workers.append(QueueWorker(settings, "hub.telemetry", tmp_path / "telemetry.log"))
        assert wait_until(
            lambda: (
                (row := device_state(engine, "walker-1")) is not None
                and row["last_values"] == {"t": 21.5}
            )
        ), "the telemetry was not stored"

        shown = subprocess.run(
            [sys.executable, "-m", "hubapp.cli", "state", "walker-1", "--json"],
            cwd=ROOT,
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["online"] is False
        assert hub.app.status()["devices_connected"]["tcp"] == 0
    finally:
        for worker in workers:
            worker.stop()
        hub.stop()
        engine.dispose()
