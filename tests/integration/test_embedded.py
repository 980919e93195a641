"""The embedded default: `hub run` with no RabbitMQ, as a user starts it, and the
clear errors of the mistakes a newcomer makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from hub.envelope import envelope_id
from hub.protocol.events import Ack, Nak
from hub.registry import Registry
from hub.storage import TelemetryRow, count_rows, make_engine, migrate
from tests.support.processes import ROOT, SimulatedDevice, wait_until
from tests.support.raw_device import RawDevice
from tests.support.services import free_port

pytestmark = pytest.mark.integration


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    # MQTT over WebSockets off, not on the default ports 8083/8084.
    env.update({"HUB_MQTT_WS_PORT": "0", "HUB_MQTT_WSS_PORT": "0"})
    env.update({"HUB_DATA_DIR": str(data_dir), "HUB_HOST": "127.0.0.1", **extra})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    return env


class HubProcess:
    """`hub run` in the embedded default as a child process."""

    def __init__(self, data_dir: Path, tcp_port: int, http_port: int) -> None:
        self.log = (data_dir.parent / f"hub-{time.monotonic_ns()}.log").open("w+")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hubapp.cli",
                "run",
                "--no-mqtt",
                "--tcp-port",
                str(tcp_port),
                "--http-port",
                str(http_port),
            ],
            cwd=ROOT,
            env=_env(data_dir),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.tcp_port = tcp_port
        if not wait_until(lambda: self.output().count("Press Ctrl+C") == 1, timeout=60):
            self.stop()
            raise AssertionError(f"hub did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    path.mkdir()
    yield path


def _provision(data_dir: Path, *device_ids: str) -> dict[str, str]:
    url = f"sqlite:///{data_dir / 'hub.sqlite3'}"
    migrate(url)
    registry = Registry(make_engine(url))
    return {d: registry.add(d) for d in device_ids}


def test_embedded_hub_stores_telemetry_and_answers_a_command(data_dir: Path) -> None:
    creds = _provision(data_dir, "emb-1", "emb-2", "emb-3")
    hub = HubProcess(data_dir, free_port(), free_port())
    device = None
    try:
        assert "mode: embedded" in hub.output()
        fleet = subprocess.run(
            [
                str(Path(sys.executable).with_name("firmware-sim")),
                "tcp",
                "--port",
                str(hub.tcp_port),
                "--devices",
                "3",
                "--prefix",
                "emb-",
                "--messages",
                "50",
                "--json",
                "--quiet",
                "--credentials-file",
                str(_write_json(data_dir.parent / "c.json", creds)),
            ],
            cwd=ROOT,
            env=_env(data_dir),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert fleet.stdout, fleet.stderr
        summary = json.loads(fleet.stdout)
        assert summary["acknowledged"] == 150, fleet.stderr
        engine = make_engine(f"sqlite:///{data_dir / 'hub.sqlite3'}")
        assert wait_until(lambda: count_rows(engine, device_prefix="emb-") == 150, timeout=60)

        device = SimulatedDevice("tcp", hub.tcp_port, "emb-1", creds["emb-1"])
        sent = subprocess.run(
            [sys.executable, "-m", "hubapp.cli", "send", "emb-1", "ping", "--wait", "30", "--json"],
            cwd=ROOT,
            env=_env(data_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["result"]["pong"] is True
    finally:
        if device is not None:
            device.stop()
        hub.stop()


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_nothing_acknowledged_is_lost_when_the_hub_is_killed(data_dir: Path) -> None:
    ((device_id, credential),) = _provision(data_dir, "kill-1").items()
    tcp_port, http_port = free_port(), free_port()
    hub = HubProcess(data_dir, tcp_port, http_port)
    acked: set[int] = set()
    boot_id = 77
    try:
        device = RawDevice(tcp_port)
        assert device.hello(device_id, credential, boot_id=boot_id) == Ack(0)
        seq = 0
        while len(acked) < 300:
            for _ in range(20):
                seq += 1
                device.telemetry(seq, {"n": seq})
            while len(acked) < seq - 40:
                event = device.next_event()
                assert isinstance(event, Ack), event
                acked.add(event.seq)
        workers = psutil.Process(hub.process.pid).children()
        assert workers, "the embedded hub runs a worker child"
        hub.kill()  # in the middle of the stream: frames in flight, batches queued
        # The worker follows its hub (parent-death signal), returning unfinished
        # messages to the local queue instead of lingering as an orphan.
        assert wait_until(
            lambda: not any(w.is_running() and w.status() != "zombie" for w in workers), timeout=30
        )
        try:
            while True:
                event = device.next_event(timeout=2)
                if isinstance(event, Ack):
                    acked.add(event.seq)
                elif not isinstance(event, Nak):
                    break
        except (TimeoutError, OSError):
            pass
        device.close()
    finally:
        hub.stop()

    restarted = HubProcess(data_dir, tcp_port, http_port)
    try:
        engine = make_engine(f"sqlite:///{data_dir / 'hub.sqlite3'}")
        wanted = {envelope_id(device_id, s, boot_id) for s in acked}

        def stored() -> set[str]:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(TelemetryRow.envelope_id).where(TelemetryRow.device_id == device_id)
                )
                return {r.envelope_id for r in rows}

        assert wait_until(lambda: wanted <= stored(), timeout=90), len(wanted - stored())
    finally:
        restarted.stop()


def _hub_run(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hubapp.cli",
            "run",
            "--no-mqtt",
            "--tcp-port",
            "0",
            "--http-port",
            "0",
            *args,
        ],
        cwd=ROOT,
        env=_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:wrong@127.0.0.1:5672//", "refused the hub"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "refused the hub"),
    ],
)
def test_a_wrong_rabbitmq_url_is_one_clear_line(data_dir: Path, url: str, expected: str) -> None:
    result = _hub_run(data_dir, "--broker-url", url)
    assert result.returncode == 2
    assert expected in result.stderr and "HUB_BROKER_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_rabbitmq_is_one_clear_line(data_dir: Path) -> None:
    result = _hub_run(data_dir, "--broker-url", f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    assert result.returncode == 2
    assert "unreachable" in result.stderr and "HUB_START_WITHOUT_BROKER" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unwritable_data_folder_is_one_clear_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # Running as root: permissions do not stop us, so use a path under a file.
            target = tmp_path / "file"
            target.write_text("")
            data_dir = target / "data"
        else:
            data_dir = locked / "data"
        result = _hub_run(data_dir)
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2
    assert "data folder" in result.stderr and "HUB_DATA_DIR" in result.stderr
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback(data_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hubapp.cli", "-v", "run"],
        cwd=ROOT,
        env=_env(data_dir, HUB_TCP_PORT="70000"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
