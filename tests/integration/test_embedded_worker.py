"""The in-hub worker of the embedded default: killed mid-task, stopped, misconfigured.

Real `hub run` processes, a real device on 127.0.0.1 and the real worker child.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from hub.envelope import envelope_id
from hub.protocol.events import Ack
from hub.settings import load_settings
from hub.storage import TelemetryRow, make_engine
from tests.integration.test_embedded import _env, _provision
from tests.support.processes import ROOT, wait_until
from tests.support.raw_device import RawDevice
from tests.support.services import free_port

pytestmark = pytest.mark.integration


class EmbeddedHub:
    """`hub run` in the embedded default as a child process, with extra settings."""

    def __init__(self, data_dir: Path, *args: str, **env: str) -> None:
        self.tcp_port = free_port()
        self.log = (data_dir.parent / f"hub-{time.monotonic_ns()}.log").open("w+")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hub.cli",
                "run",
                "--no-mqtt",
                "--tcp-port",
                str(self.tcp_port),
                "--http-port",
                str(free_port()),
                *args,
            ],
            cwd=ROOT,
            env=_env(data_dir, **env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if not wait_until(lambda: "Press Ctrl+C" in self.output(), timeout=90):
            self.stop()
            raise AssertionError(f"hub did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def _worker_of(hub: EmbeddedHub, timeout: float = 60) -> psutil.Process:
    """The hub's worker child (waits for the supervisor to start one)."""
    found: list[psutil.Process] = []

    def alive() -> bool:
        found[:] = [
            c
            for c in psutil.Process(hub.process.pid).children()
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
        ]
        return bool(found)

    assert wait_until(alive, timeout=timeout), f"no worker child:\n{hub.output()}"
    return found[0]


def _stored(data_dir: Path, device_id: str) -> set[str]:
    engine = make_engine(f"sqlite:///{data_dir / 'hub.sqlite3'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(TelemetryRow.envelope_id).where(TelemetryRow.device_id == device_id)
            )
            return {r.envelope_id for r in rows}
    finally:
        engine.dispose()


def queue_rows(data_dir: Path) -> int:
    """Every message row the local queue file still holds, handed out or not."""
    url = load_settings(data_dir=data_dir).effective_broker_url
    path = Path(url.split(":///", 1)[1].split("?", 1)[0])
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        tables = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if "message" in r[0]
        ]
        return sum(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables)


def test_acknowledged_messages_survive_sigkills_of_the_worker(data_dir: Path) -> None:
    """Defect B: a worker killed mid-task loses nothing, and the queue does not grow."""
    ((device_id, credential),) = _provision(data_dir, "wkill-1").items()
    # Small batches: the worker falls behind the device, so whenever it is
    # killed it holds task messages it was handed and has not finished.
    hub = EmbeddedHub(data_dir, HUB_BATCH_MAX_MESSAGES="10")
    boot_id = 5
    acked: set[int] = set()
    kills = 0
    try:
        device = RawDevice(hub.tcp_port)
        assert device.hello(device_id, credential, boot_id=boot_id) == Ack(0)
        seq = 0
        while len(acked) < 800:
            for _ in range(50):
                seq += 1
                device.telemetry(seq, {"n": seq, "pad": "x" * 64})
            while len(acked) < seq - 150:
                event = device.next_event(timeout=60)
                assert isinstance(event, Ack), event
                acked.add(event.seq)
            if kills < 3 and len(acked) >= 250 * (kills + 1):
                # In the middle of the stream, once this worker is storing: it
                # holds a task message it was handed and has not finished.
                worker = _worker_of(hub)
                before = len(_stored(data_dir, device_id))
                assert wait_until(lambda n=before: len(_stored(data_dir, device_id)) > n, 60)
                worker.send_signal(signal.SIGKILL)
                kills += 1
        acked |= device.acks_until(seq, timeout=60)
        device.close()
        wanted = {envelope_id(device_id, s, boot_id) for s in acked}
        # The supervisor's new worker takes over what the killed ones held.
        assert wait_until(lambda: wanted <= _stored(data_dir, device_id), timeout=120), (
            f"lost {len(wanted - _stored(data_dir, device_id))} of {len(wanted)} acknowledged"
        )
        assert "restarting it" in hub.output()
        # What was processed is removed from the local queue.
        assert wait_until(lambda: queue_rows(data_dir) == 0, timeout=60), queue_rows(data_dir)
    finally:
        hub.stop()
