"""The in-hub worker of the embedded default: killed mid-task, stopped, misconfigured.

Real `hub run` processes, a real device on 127.0.0.1 and the real worker child.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select, text

from hub.envelope import Envelope, Kind, envelope_id
from hub.protocol.events import Ack
from hub.storage import TelemetryRow, make_engine, migrate, store_envelopes
from tests.integration.test_embedded import _env as _base_env
from tests.integration.test_embedded import _provision
from tests.support.processes import ROOT, wait_until
from tests.support.raw_device import RawDevice
from tests.support.services import free_port

pytestmark = pytest.mark.integration


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = _base_env(data_dir, **extra)
    if "PYTHONPATH" in extra:
        env["PYTHONPATH"] = extra["PYTHONPATH"]
    return env


class EmbeddedHub:
    """`hub run` in the embedded default as a child process, with extra settings."""

    def __init__(self, data_dir: Path, *args: str, **env: str) -> None:
        self.tcp_port = free_port()
        self.log = (data_dir.parent / f"hub-{time.monotonic_ns()}.log").open("w+")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hubapp.cli",
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


def queue_rows(data_dir: Path, queue: str | None = None) -> int:
    """Message rows the local queue file still holds, handed out or not.

    Without `queue`, every table with messages in its name counts, so that the
    same check reads kombu's SQLAlchemy transport's file as well as ours.
    """
    path = data_dir / "queue.sqlite3"
    assert path.exists(), path
    with sqlite3.connect(path) as db:
        if queue is not None:
            query = "SELECT count(*) FROM queue_messages WHERE queue = ?"
            return int(db.execute(query, (queue,)).fetchone()[0])
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


_SLOW_HANDLER = """
import os, pathlib, time
from tasks.handlers import handler

MARKS = pathlib.Path(os.environ["TEST_HANDLER_MARKS"])


@handler(kind="telemetry", devices="hnd-*")
def slow(envelope):
    (MARKS / f"started-{envelope.id}").write_text("")
    time.sleep(float(os.environ.get("TEST_HANDLER_SLEEP_S", "0")))
    (MARKS / f"finished-{envelope.id}").write_text("")
"""

_WORKS_ONCE = """
import os, pathlib

count = pathlib.Path(os.environ["TEST_HANDLER_MARKS"]) / "imports"
with count.open("a") as fh:
    fh.write("x")
if len(count.read_text()) >= 2:
    raise RuntimeError("this module imports only once")
"""


def _handler_env(tmp_path: Path, module: str, source: str, **extra: str) -> dict[str, str]:
    """Variables that make `module` (written from `source`) importable by hub and worker."""
    code = tmp_path / "handler_code"
    code.mkdir(exist_ok=True)
    (code / f"{module}.py").write_text(source)
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    return {
        "PYTHONPATH": os.pathsep.join([str(code), str(ROOT), str(ROOT / "firmware-sim")]),
        "TEST_HANDLER_MARKS": str(marks),
        **extra,
    }


def _marks(tmp_path: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in (tmp_path / "marks").glob(f"{prefix}*"))


def _send_one(hub: EmbeddedHub, device_id: str, credential: str) -> None:
    device = RawDevice(hub.tcp_port)
    try:
        assert device.hello(device_id, credential) == Ack(0)
        device.telemetry(1, {"t": 1})
        assert device.acks_until(1) == {1}
    finally:
        device.close()


def test_handlers_named_in_the_settings_file_run_in_the_embedded_default(
    data_dir: Path, tmp_path: Path
) -> None:
    """Item 3: the in-hub worker gets the hub's settings, the file's handlers included."""
    creds = _provision(data_dir, "hnd-1")
    config = tmp_path / "hub.toml"
    config.write_text('handlers = ["slow_handler"]\n')
    env = _handler_env(tmp_path, "slow_handler", _SLOW_HANDLER)
    hub = EmbeddedHub(data_dir, **env, HUB_CONFIG=str(config))
    try:
        _send_one(hub, "hnd-1", creds["hnd-1"])
        assert wait_until(lambda: len(_marks(tmp_path, "finished-")) == 1, timeout=60), hub.output()
    finally:
        hub.stop()


def test_a_stopping_hub_lets_its_worker_finish_the_task_in_hand(
    data_dir: Path, tmp_path: Path
) -> None:
    """Item 2: SIGTERM to the hub is a warm shutdown of the worker, never a kill mid-task."""
    creds = _provision(data_dir, "hnd-2")
    env = _handler_env(tmp_path, "slow_handler", _SLOW_HANDLER, TEST_HANDLER_SLEEP_S="4")
    hub = EmbeddedHub(data_dir, **env, HUB_HANDLERS="slow_handler")
    _send_one(hub, "hnd-2", creds["hnd-2"])
    assert wait_until(lambda: len(_marks(tmp_path, "started-")) == 1, timeout=60), hub.output()
    assert hub.stop(signal.SIGTERM) == 0
    output = hub.output() if not hub.log.closed else Path(hub.log.name).read_text()
    assert len(_marks(tmp_path, "finished-")) == 1, output
    assert "task worker stopped (status 0)" in output
    assert queue_rows(data_dir, "hub.handlers") == 0  # done, so acknowledged


def test_a_worker_past_its_stop_timeout_is_killed_and_its_task_stays_queued(
    data_dir: Path, tmp_path: Path
) -> None:
    creds = _provision(data_dir, "hnd-3")
    env = _handler_env(tmp_path, "slow_handler", _SLOW_HANDLER, TEST_HANDLER_SLEEP_S="120")
    hub = EmbeddedHub(data_dir, **env, HUB_HANDLERS="slow_handler", HUB_WORKER_STOP_TIMEOUT_S="2")
    _send_one(hub, "hnd-3", creds["hnd-3"])
    assert wait_until(lambda: len(_marks(tmp_path, "started-")) == 1, timeout=60), hub.output()
    assert hub.stop(signal.SIGTERM) == 0
    output = Path(hub.log.name).read_text()
    assert "killing it" in output and not _marks(tmp_path, "finished-")
    # The handler run it was in the middle of, back in the queue for the next start.
    assert queue_rows(data_dir, "hub.handlers") == 1


_FREE_PORTS = ("--tcp-port", "0", "--http-port", "0")


def _hub_run(data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubapp.cli", "run", "--no-mqtt", *_FREE_PORTS],
        cwd=ROOT,
        env=_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    errors = [x for x in result.stderr.splitlines() if "error" in x.lower()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_handler_module_that_does_not_import_stops_hub_run_with_one_line(
    data_dir: Path, tmp_path: Path
) -> None:
    """Item 3: caught before the hub serves, not only in worker.log."""
    result = _hub_run(data_dir, {"HUB_HANDLERS": "no_such_handlers_module"})
    line = _one_error_line(result)
    assert line.startswith("hub: configuration error: handler module 'no_such_handlers_module'")
    assert "HUB_HANDLERS" in line or "handlers" in line
    assert "Press Ctrl+C" not in result.stdout


def test_a_bad_hub_value_stops_hub_run_with_one_line(data_dir: Path) -> None:
    line = _one_error_line(_hub_run(data_dir, {"HUB_WORKER_STOP_TIMEOUT_S": "-1"}))
    assert "HUB_WORKER_STOP_TIMEOUT_S" in line


def test_a_worker_with_a_configuration_error_is_not_restarted_in_a_loop(
    data_dir: Path, tmp_path: Path
) -> None:
    """The check passes, the worker then fails its own: the hub stops with that line."""
    env = _handler_env(tmp_path, "works_once", _WORKS_ONCE, HUB_HANDLERS="works_once")
    result = _hub_run(data_dir, env)
    line = _one_error_line(result)
    assert "works_once" in line and "imports only once" in line
    assert "Press Ctrl+C" in result.stdout  # it did start, then stopped on its own
    assert (tmp_path / "marks" / "imports").read_text() == "xx"  # check, worker; no restart
    assert "restarting" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=str)
def test_every_stop_signal_is_a_clean_stop(data_dir: Path, sig: signal.Signals) -> None:
    """Item 7: stop accepting, make what was accepted durable, let the worker finish."""
    ((device_id, credential),) = _provision(data_dir, f"sig-{sig.name}").items()
    hub = EmbeddedHub(data_dir)
    acked: set[int] = set()
    worker = _worker_of(hub)
    device = RawDevice(hub.tcp_port)
    try:
        assert device.hello(device_id, credential, boot_id=3) == Ack(0)
        seq = 0
        while len(acked) < 300:
            for _ in range(20):
                seq += 1
                device.telemetry(seq, {"n": seq})
            while len(acked) < seq - 40:
                event = device.next_event(timeout=60)
                assert isinstance(event, Ack), event
                acked.add(event.seq)
        # Once the worker is past its start (it stored something), and with
        # frames in flight:
        assert wait_until(lambda: bool(_stored(data_dir, device_id)), timeout=90)
        for _ in range(20):
            seq += 1
            device.telemetry(seq, {"n": seq})
        hub.process.send_signal(sig)
        try:
            while True:
                event = device.next_event(timeout=30)
                if not isinstance(event, Ack):
                    break
                acked.add(event.seq)
        except (TimeoutError, OSError):
            pass
        assert hub.process.wait(120) == 0
    finally:
        device.close()
        hub.stop()
    output = Path(hub.log.name).read_text()
    assert "stopped" in output and "task worker stopped (status 0)" in output, output
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    restarted = EmbeddedHub(data_dir)
    try:
        wanted = {envelope_id(device_id, s, 3) for s in acked}
        assert wait_until(lambda: wanted <= _stored(data_dir, device_id), timeout=90), len(
            wanted - _stored(data_dir, device_id)
        )
    finally:
        restarted.stop()


def test_the_in_hub_worker_runs_the_periodic_upkeep(data_dir: Path) -> None:
    # hub run in the embedded default: its worker child claims the upkeep lease
    # and applies the retention; the hub process itself runs no upkeep.
    url = f"sqlite:///{data_dir / 'hub.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    old = datetime.now(UTC) - timedelta(days=30)
    store_envelopes(
        engine,
        [
            Envelope(device_id="old", kind=Kind.TELEMETRY, payload={"t": n}, transport="tcp",
                     protocol="native", seq=n, id=envelope_id("old", n, 1), received_at=old)
            for n in range(3)
        ],
    )  # fmt: skip
    hub = EmbeddedHub(data_dir, HUB_TELEMETRY_RETENTION_DAYS="7")
    try:

        def telemetry_rows() -> int:
            with engine.connect() as conn:
                return int(
                    conn.execute(select(func.count()).select_from(TelemetryRow)).scalar_one()
                )

        assert wait_until(lambda: telemetry_rows() == 0, timeout=60), hub.output()
        with engine.connect() as conn:
            holder = conn.execute(text("SELECT holder FROM maintenance_leases")).scalar_one()
        worker = psutil.Process(hub.process.pid).children(recursive=True)
        assert holder.endswith(tuple(f"/{p.pid}" for p in worker)), holder
    finally:
        hub.stop()
        engine.dispose()
