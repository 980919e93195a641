"""The reliability harness: real processes, faults injected from outside, and the books kept.

Everything here is real: a private RabbitMQ node, `python -m hubapp.cli run`
subprocesses, `celery -A tasks worker` processes, simulated devices
(`firmware_sim`) on real sockets of 127.0.0.1. Nothing is mocked.

The API (kept stable; scenarios build on it):

- `RabbitNode(base_dir)`: a private RabbitMQ node on free ports. `start()`
  (waits until AMQP answers), `stop()`, `start()` again on the same mnesia
  folder, `sigstop()` / `sigcont()`, `sigkill()`, `url` (amqp URL of its
  default vhost), `close()` (always stops it; the `rabbit_node` fixture calls it).
- `HubOptions` + `HubProcess(options)`: `python -m hubapp.cli run` on fixed free
  ports (they survive restarts), `broker_url=None` is the embedded default.
  `start()`, `kill()` (SIGKILL), `terminate()` (SIGTERM, waits), `start()` again
  on the same data folder, `children()` (its live child pids), `log_text()`,
  `metric(name)` (a value of its /metrics).
- `WorkerProcess(options, log_path)`: a real `celery -A tasks worker`
  (`tests.support.processes.Worker`) with `kill()` (SIGKILL of it and its pool).
- `provision(database_url, ids)`: register devices; `{id: credential}`.
- `Fleet(FleetOptions)`: TCP (native) and MQTT (QoS 1) devices streaming from a
  background thread until `stop()`, reconnecting and resending what was not
  acknowledged. `acked` maps device id to the set of (boot, seq) the hub
  acknowledged; `acks_between(t0, t1)` counts acknowledgements in a time span.
- `read_stored(database_url, device_ids)`, `compare(acked, stored)` ->
  `Comparison(acknowledged, stored, lost, duplicates, unprocessed)`;
  `wait_stored(...)` polls until every acknowledged message is stored.
- `record_result(scenario, transport, comparison, recovery_s)`: one JSON line
  in `build/reliability/results.jsonl` (or `$RELIABILITY_RESULTS`);
  `python -m tests.reliability.report` renders them as a markdown table.

Duplicates are counted twice over: rows stored more than once for one
(device, boot, seq), and runs of the recording handler
(`tests.reliability.recording_handler`, a table with no unique key) more than
once for one envelope id, so a double processing shows even though the
telemetry table's key would hide a double store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import inspect, text

from firmware_sim.device import SimulatedDevice
from firmware_sim.fleet import FleetStats, run_devices
from firmware_sim.mqtt_device import MqttDevice
from firmware_sim.options import FleetOptions as SimOptions
from firmware_sim.tcp_device import TcpDevice
from hub.envelope import envelope_id
from hub.registry import Registry
from hub.storage import make_engine, migrate
from tests.support.processes import ROOT, Worker, make_test_settings
from tests.support.services import free_port

RESULTS_ENV = "RELIABILITY_RESULTS"
DEFAULT_RESULTS = ROOT / "build" / "reliability" / "results.jsonl"
RECORDING_HANDLER = "tests.reliability.recording_handler"

START_RABBITMQ_SERVER = (
    "rabbitmq-server is not on PATH; the reliability suite starts private RabbitMQ nodes "
    "with it (Debian: `apt-get install -y rabbitmq-server`)"
)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# A private RabbitMQ node
# ---------------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of its own (own name, ports, mnesia and log folders).

    Run as root, `rabbitmq-server` drops to the `rabbitmq` user, so the
    folders are handed to that user. The node's pid comes from its pid file;
    signals go to that beam process.
    """

    def __init__(
        self, base_dir: Path, *, name: str | None = None, cookie: str | None = None
    ) -> None:
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            pytest.fail(START_RABBITMQ_SERVER, pytrace=False)
        self.base_dir = base_dir
        self.port = free_port()
        self.dist_port = self.port + 20000 if self.port + 20000 < 65536 else free_port()
        self.name = name or f"hubrel{os.getpid()}x{self.port}@localhost"
        #: The Erlang cookie of a cluster's nodes (and of rabbitmqctl talking to
        #: them): our own, so they can never join the machine's RabbitMQ.
        self.cookie = cookie
        self.pid: int | None = None
        self._owned_dir: Path | None = None
        if os.geteuid() == 0:
            # The node runs as the `rabbitmq` user, which cannot enter a root-only
            # temporary folder (pytest's are 0700): give it a folder of its own.
            self._owned_dir = Path(tempfile.mkdtemp(prefix="hub-rabbit-"))
            self._owned_dir.chmod(0o755)
            base_dir.parent.mkdir(parents=True, exist_ok=True)
            self._logs_copy = base_dir / "log"  # the node's logs, kept with the test's files
            base_dir = self._owned_dir
            self.base_dir = base_dir
        base_dir.mkdir(parents=True, exist_ok=True)
        (base_dir / "enabled_plugins").write_text("[].\n")
        (base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            # The suite fills no disk; keep the node from blocking publishers on a
            # small test machine's disk alarm.
            "disk_free_limit.absolute = 1MB\n"
        )
        self._chown()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _chown(self) -> None:
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam("rabbitmq")
        except KeyError:
            return
        for path in [self.base_dir, *self.base_dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base_dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_PID_FILE=str(self.base_dir / "rabbitmq.pid"),
        )
        if self.cookie is not None:
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = f"-setcookie {self.cookie}"
        return env

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cookie = ["--erlang-cookie", self.cookie] if self.cookie is not None else []
        return subprocess.run(
            ["rabbitmqctl", "-q", *cookie, "-n", self.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 120) -> None:
        """Start the node (again, on the same mnesia folder) and wait until AMQP answers."""
        self._chown()
        with contextlib.suppress(FileNotFoundError):
            (self.base_dir / "rabbitmq.pid").unlink()
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid_file = self.base_dir / "rabbitmq.pid"
            if pid_file.exists() and pid_file.read_text().strip().isdigit():
                self.pid = int(pid_file.read_text().strip())
            if self.pid is not None and _port_open(self.port) and self._amqp_ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"RabbitMQ node {self.name} not ready in {timeout} s: {self.log_tail()}")

    def _amqp_ok(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=3) as connection:
                connection.ensure_connection(max_retries=0)
            return True
        except Exception:  # not up yet
            return False

    def log_tail(self, chars: int = 2000) -> str:
        logs = sorted((self.base_dir / "log").glob("*.log"))
        return "".join(p.read_text(errors="replace")[-chars:] for p in logs)

    def _alive(self) -> bool:
        return (
            self.pid is not None
            and psutil.pid_exists(self.pid)
            and (psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE)
        )

    def stop(self, timeout: float = 60) -> None:
        """A clean stop (`rabbitmqctl stop`); waits until the process is gone."""
        if not self._alive():
            return
        self._ctl("stop", timeout=timeout)
        if not wait_for(lambda: not self._alive(), timeout):
            self.sigkill()
        self.pid = None

    def sigstop(self) -> None:
        """Freeze the node: its sockets stay open and silent (no RST), like a partition."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)

    def sigkill(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not self._alive(), 30)
        self.pid = None

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n <this node> ...`; its output, or an error with its stderr."""
        done = self._ctl(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stderr}")
        return done.stdout

    def close(self) -> None:
        """Always leaves no node behind, whatever state it is in."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            self.stop(timeout=30)
        self.sigkill()
        if self._owned_dir is not None:
            with contextlib.suppress(OSError):
                shutil.copytree(self._owned_dir / "log", self._logs_copy, dirs_exist_ok=True)
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None


class RabbitCluster:
    """Three (or `size`) private nodes, `c1@localhost`-like names of their own,
    one Erlang cookie, joined into one cluster: `rabbitmqctl -n cN stop_app;
    join_cluster c1; start_app`. Never the machine's RabbitMQ."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        cookie = uuid.uuid4().hex.upper()
        tag = f"hubcluster{os.getpid()}"
        self.nodes = [
            RabbitNode(base_dir / f"c{n}", name=f"{tag}c{n}@localhost", cookie=cookie)
            for n in range(1, size + 1)
        ]

    @property
    def url(self) -> str:
        """The cluster as a failover URL: every node, first to last, `;`-separated."""
        return ";".join(node.url for node in self.nodes)

    def start(self) -> None:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        if not self.all_running():
            raise RuntimeError(f"not all {len(self.nodes)} nodes run in one cluster")

    def all_running(self) -> bool:
        """Every node runs, and one of them sees all of them in the cluster."""
        if not all(node._alive() for node in self.nodes):
            return False
        try:
            out = self.nodes[0].ctl("eval", "length(rabbit_nodes:all_running()).")
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return out.strip() == str(len(self.nodes))

    def node_on_port(self, port: int) -> RabbitNode:
        return next(node for node in self.nodes if node.port == port)

    def connected_nodes(self, pid: int) -> list[RabbitNode]:
        """The nodes a process (its children included) holds an AMQP connection to."""
        ports: set[int] = set()
        try:
            family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for process in family:
            with contextlib.suppress(psutil.Error):
                for conn in process.net_connections(kind="tcp"):
                    if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                        ports.add(conn.raddr.port)
        return [node for node in self.nodes if node.port in ports]

    def quorum_leaders(self, vhost: str = "/") -> dict[str, str]:
        """{queue: node of its leader} for the quorum queues of `vhost`."""
        for node in self.nodes:
            if not node._alive():
                continue
            out = node.ctl(
                "list_queues", "-p", vhost, "name", "type", "leader", "--no-table-headers"
            )
            return {
                parts[0]: parts[2]
                for parts in (line.split() for line in out.splitlines())
                if len(parts) >= 3 and parts[1] == "quorum"
            }
        return {}

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.close()


# ---------------------------------------------------------------------------
# The hub and workers as processes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HubOptions:
    """How to run one hub process; ports are fixed so devices find it after a restart."""

    data_dir: Path
    database_url: str
    broker_url: str | None = None  # None: the embedded default
    handlers: tuple[str, ...] = (RECORDING_HANDLER,)
    mqtt: bool = True
    env: Mapping[str, str] = field(default_factory=dict)  # further HUB_* settings
    tcp_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)


def hub_env(options: HubOptions) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(
        HUB_DATA_DIR=str(options.data_dir),
        HUB_DATABASE_URL=options.database_url,
        HUB_HOST="127.0.0.1",
        HUB_TCP_PORT=str(options.tcp_port),
        HUB_MQTT_PORT=str(options.mqtt_port),
        # MQTT over WebSockets is off (0), not on its default ports 8083/8084.
        HUB_MQTT_WS_PORT="0",
        HUB_MQTT_WSS_PORT="0",
        HUB_HTTP_PORT=str(options.http_port),
        HUB_MQTT_ENABLED="true" if options.mqtt else "false",
        HUB_BROKER_RETRY_INTERVAL_S="0.5",
        HUB_START_WITHOUT_BROKER="true",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")]),
        # Healthy and hostile clients all connect from 127.0.0.1 here; the
        # limits per source address have their own test
        # (tests/integration/test_address_limits.py).
        HUB_MAX_CONNECTS_PER_ADDRESS_PER_S="0",
        HUB_MAX_CONNECTIONS_PER_ADDRESS="0",
        HUB_AUTH_FAILURES_PER_ADDRESS="0",
    )
    if options.broker_url:
        env["HUB_BROKER_URL"] = options.broker_url
    if options.handlers:
        env["HUB_HANDLERS"] = ",".join(options.handlers)
    env.update(options.env)
    return env


class HubProcess:
    """`python -m hubapp.cli run` as a child process; restartable on the same data folder."""

    def __init__(self, options: HubOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        options.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.options.data_dir.parent / f"{self.options.data_dir.name}-hub.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 90) -> None:
        self.starts += 1
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts} ===\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hubapp.cli", "run"],
                cwd=ROOT,
                env=hub_env(self.options),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hub exited with {self.process.returncode}:\n{self.log_text()}")
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                if b"Press Ctrl+C to stop." in fh.read():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"hub not ready in {timeout} s:\n{self.log_text()[-4000:]}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def children(self) -> list[int]:
        """Pids of the hub's live descendants (the in-hub worker and its pool)."""
        if not self.running:
            return []
        assert self.process is not None
        try:
            return [c.pid for c in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def metric(self, name: str) -> float:
        """A sample of the hub's /metrics (summed over labels); 0 when absent."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.options.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == name
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the clean stop; its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return int(self.process.returncode)

    def close(self, child_pids: Iterable[int] = ()) -> None:
        """Stop the hub and anything it left behind."""
        pids = [*self.children(), *child_pids]
        if self.running:
            self.terminate(timeout=30)
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                psutil.Process(pid).kill()


@dataclass(frozen=True)
class WorkerOptions:
    broker_url: str
    database_url: str
    data_dir: Path
    handlers: tuple[str, ...] = (RECORDING_HANDLER,)
    concurrency: int = 1
    settings: Mapping[str, Any] = field(default_factory=dict)  # further settings


class WorkerProcess(Worker):
    """A real `celery -A tasks worker` that can also be SIGKILLed, pool and all."""

    def __init__(self, options: WorkerOptions, log_path: Path) -> None:
        settings = make_test_settings(
            options.data_dir,
            broker_url=options.broker_url,
            database_url=options.database_url,
            handlers=options.handlers,
            **options.settings,
        )
        super().__init__(settings, log_path, concurrency=options.concurrency)

    def kill(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            family = [self.process.pid] + [
                c.pid for c in psutil.Process(self.process.pid).children(recursive=True)
            ]
        except psutil.NoSuchProcess:
            family = [self.process.pid]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)


def provision(database_url: str, device_ids: Iterable[str]) -> dict[str, str]:
    """Migrate the database and register the devices; {device id: credential}."""
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        registry = Registry(engine)
        return {device_id: registry.add(device_id) for device_id in device_ids}
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------
# The fleet
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetOptions:
    """Devices to stream: `tcp` and `mqtt` are {device id: credential}."""

    tcp_port: int
    mqtt_port: int
    tcp: Mapping[str, str] = field(default_factory=dict)
    mqtt: Mapping[str, str] = field(default_factory=dict)
    rate: float = 5.0  # messages per second per device
    window: int = 32
    #: A device with messages owed and no acknowledgement for this long reconnects
    #: and resends (as real firmware would); short, so that a hung hub is noticed.
    ack_timeout_s: float = 10.0
    drain_timeout_s: float = 60.0


class Fleet:
    """Streaming devices on a loop in a background thread, with the books kept.

    The devices run until `stop()`; they never give up, reconnect with backoff
    when the hub goes away, and resend everything not acknowledged.
    """

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.acked: dict[str, set[tuple[int, int]]] = collections.defaultdict(set)
        self.transport_of: dict[str, str] = {
            **{d: "tcp" for d in options.tcp},
            **{d: "mqtt" for d in options.mqtt},
        }
        self._ack_times: list[float] = []
        self._lock = threading.Lock()
        self.stats = FleetStats()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stop_event: asyncio.Event | None = None
        self._future: Any = None
        self.devices: list[SimulatedDevice[Any]] = []

    def _on_ack(self, device_id: str, boot: int, seq: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.acked[device_id].add((boot, seq))
            self._ack_times.append(now)

    def start(self) -> None:
        self._thread.start()

        async def main() -> Any:
            self._stop_event = asyncio.Event()
            o = self.options
            tcp = SimOptions(
                transport="tcp",
                host="127.0.0.1",
                port=o.tcp_port,
                devices=list(o.tcp.items()),
                rate=o.rate,
                window=o.window,
                give_up_s=None,
                ack_timeout_s=o.ack_timeout_s,
                drain_timeout_s=o.drain_timeout_s,
            )
            mqtt = replace(
                tcp, transport="mqtt", port=o.mqtt_port, devices=list(o.mqtt.items()), qos=1
            )
            stop, stats, on_ack = self._stop_event, self.stats, self._on_ack
            for device_id, credential in tcp.devices:
                self.devices.append(
                    TcpDevice(
                        device_id, credential, tcp, stats=stats, stop=stop, on_acknowledged=on_ack
                    )
                )
            for device_id, credential in mqtt.devices:
                self.devices.append(
                    MqttDevice(
                        device_id, credential, mqtt, stats=stats, stop=stop, on_acknowledged=on_ack
                    )
                )
            return await run_devices(self.devices, transport="mixed", stats=self.stats)

        self._future = asyncio.run_coroutine_threadsafe(main(), self.loop)

    def acknowledged(self) -> int:
        with self._lock:
            return len(self._ack_times)

    def snapshot(self) -> dict[str, set[tuple[int, int]]]:
        """A copy of what has been acknowledged so far."""
        with self._lock:
            return {d: set(v) for d, v in self.acked.items()}

    def acks_between(self, start: float, end: float) -> int:
        """Acknowledgements received in [start, end) (time.monotonic())."""
        with self._lock:
            return sum(1 for t in self._ack_times if start <= t < end)

    def last_ack_at(self) -> float:
        with self._lock:
            return self._ack_times[-1] if self._ack_times else 0.0

    def wait_acks(self, count: int, timeout: float) -> bool:
        """Wait until `count` more acknowledgements than now arrived."""
        target = self.acknowledged() + count
        return wait_for(lambda: self.acknowledged() >= target, timeout)

    def stop(self, timeout: float = 120) -> None:
        """Stop sending; outstanding messages are awaited (`drain_timeout_s`), then disconnect."""
        if self._future is None:
            return
        if self._stop_event is not None:
            self.loop.call_soon_threadsafe(self._stop_event.set)
        try:
            self._future.result(timeout)
        finally:
            self._future = None
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()

    def outstanding(self) -> int:
        return sum(d.outstanding for d in self.devices)

    def by_transport(
        self, acked: Mapping[str, set[tuple[int, int]]]
    ) -> dict[str, dict[str, set[tuple[int, int]]]]:
        split: dict[str, dict[str, set[tuple[int, int]]]] = collections.defaultdict(dict)
        for device_id, pairs in acked.items():
            split[self.transport_of[device_id]][device_id] = pairs
        return dict(split)


# ---------------------------------------------------------------------------
# What was stored, and the comparison
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """What the database holds for some devices."""

    telemetry: Mapping[str, int]  # envelope id -> rows (the key makes this 1)
    handler_runs: Mapping[str, int]  # envelope id -> recording handler runs
    order: Mapping[str, list[int]]  # device id -> seqs in the order they were stored


def read_stored(database_url: str, device_ids: Iterable[str]) -> Stored:
    ids = sorted(set(device_ids))
    engine = make_engine(database_url)
    telemetry: collections.Counter[str] = collections.Counter()
    runs: collections.Counter[str] = collections.Counter()
    order: dict[str, list[int]] = collections.defaultdict(list)
    # SQLite keeps the insertion order in rowid; PostgreSQL has none, the
    # receive time stands in for it.
    order_by = "rowid" if engine.dialect.name == "sqlite" else "received_at"
    try:
        has_runs = inspect(engine).has_table("reliability_handler_runs")
        with engine.connect() as conn:
            for chunk_start in range(0, len(ids), 200):
                chunk = ids[chunk_start : chunk_start + 200]
                marks = ",".join(f":d{i}" for i in range(len(chunk)))
                params = {f"d{i}": d for i, d in enumerate(chunk)}
                for envelope, device, seq in conn.execute(
                    text(
                        "SELECT envelope_id, device_id, seq FROM telemetry "
                        f"WHERE device_id IN ({marks}) ORDER BY {order_by}"
                    ),
                    params,
                ):
                    telemetry[envelope] += 1
                    order[device].append(int(seq))
                if has_runs:
                    for (envelope,) in conn.execute(
                        text(
                            "SELECT envelope_id FROM reliability_handler_runs "
                            f"WHERE device_id IN ({marks})"
                        ),
                        params,
                    ):
                        runs[envelope] += 1
    finally:
        engine.dispose()
    return Stored(dict(telemetry), dict(runs), dict(order))


@dataclass(frozen=True)
class Comparison:
    acknowledged: int
    stored: int  # acknowledged messages found stored
    lost: int  # acknowledged, not stored
    duplicates: int  # extra rows, plus extra handler runs, per envelope
    unprocessed: int  # stored, acknowledged, but the handler never ran
    lost_examples: tuple[str, ...] = ()
    duplicate_examples: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing twice, and every stored message's handler ran."""
        return self.lost == 0 and self.duplicates == 0 and self.unprocessed == 0


def expected_ids(acked: Mapping[str, Iterable[tuple[int, int]]]) -> dict[str, str]:
    """{envelope id: "device boot seq"} for what was acknowledged."""
    return {
        envelope_id(device, seq, boot): f"{device} boot={boot} seq={seq}"
        for device, pairs in acked.items()
        for boot, seq in pairs
    }


def compare(acked: Mapping[str, Iterable[tuple[int, int]]], stored: Stored) -> Comparison:
    """Acknowledged (boot, seq) per device against what the database holds."""
    wanted = expected_ids(acked)
    lost = [label for eid, label in wanted.items() if stored.telemetry.get(eid, 0) == 0]
    dup_rows = {eid: n - 1 for eid, n in stored.telemetry.items() if n > 1 and eid in wanted}
    dup_runs = {eid: n - 1 for eid, n in stored.handler_runs.items() if n > 1 and eid in wanted}
    unprocessed = [
        eid for eid in wanted if stored.telemetry.get(eid, 0) and not stored.handler_runs.get(eid)
    ]
    return Comparison(
        acknowledged=len(wanted),
        stored=len(wanted) - len(lost),
        lost=len(lost),
        duplicates=sum(dup_rows.values()) + sum(dup_runs.values()),
        unprocessed=len(unprocessed),
        lost_examples=tuple(sorted(lost)[:10]),
        duplicate_examples=tuple(sorted(wanted[e] for e in {*dup_rows, *dup_runs})[:10]),
    )


def wait_stored(
    database_url: str,
    acked: Mapping[str, Iterable[tuple[int, int]]],
    timeout: float = 180,
    *,
    handlers: bool = True,
) -> Comparison:
    """Poll until every acknowledged message is stored (and its handler ran), or timeout."""
    acked = {d: set(p) for d, p in acked.items()}
    deadline = time.monotonic() + timeout
    while True:
        result = compare(acked, read_stored(database_url, acked))
        done = result.lost == 0 and (not handlers or result.unprocessed == 0)
        if done or time.monotonic() >= deadline:
            return result
        time.sleep(1.0)


def in_order(stored: Stored, acked: Mapping[str, Iterable[tuple[int, int]]]) -> list[str]:
    """Devices whose acknowledged messages were stored out of seq order (one boot each)."""
    wrong = []
    for device in acked:
        seqs = stored.order.get(device, [])
        if seqs != sorted(seqs):
            wrong.append(device)
    return wrong


# ---------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


def record_result(
    scenario: str, transport: str, comparison: Comparison, recovery_s: float | None
) -> dict[str, Any]:
    """Append one scenario's figures as a JSON line; returns the line's data."""
    line = {
        "scenario": scenario,
        "transport": transport,
        "acknowledged": comparison.acknowledged,
        "stored": comparison.stored,
        "lost": comparison.lost,
        "duplicates": comparison.duplicates,
        "unprocessed": comparison.unprocessed,
        "recovery_s": None if recovery_s is None else round(recovery_s, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    return line


def describe(comparison: Comparison) -> str:
    data = asdict(comparison)
    return json.dumps(data, indent=1)


# ---------------------------------------------------------------------------
# Ending a scenario
# ---------------------------------------------------------------------------


def measure_recovery(
    fleet: Fleet, database_url: str, lifted_at: float, timeout: float = 240
) -> float:
    """Seconds from `lifted_at` (the fault removed) until acknowledgements flow again
    and everything acknowledged up to now is stored. (Handler runs, one task per
    envelope, may take longer; `conclude()` waits for them before comparing.)"""
    snapshot = fleet.snapshot()
    wait_for(lambda: fleet.last_ack_at() > lifted_at, timeout)
    acks_back = fleet.last_ack_at() - lifted_at
    wait_stored(database_url, snapshot, timeout, handlers=False)
    return max(acks_back, time.monotonic() - lifted_at)


def conclude(
    scenario: str,
    fleet: Fleet,
    database_url: str,
    *,
    recovery_s: float | None,
    timeout: float = 240,
    settle_s: float = 3.0,
) -> dict[str, Comparison]:
    """Stop the fleet, wait for storage, compare per transport and record the results."""
    fleet.stop()
    acked = fleet.snapshot()
    wait_stored(database_url, acked, timeout)
    # Late redeliveries would show as duplicates: give them a moment.
    time.sleep(settle_s)
    stored = read_stored(database_url, acked)
    results: dict[str, Comparison] = {}
    for transport, part in sorted(fleet.by_transport(acked).items()):
        comparison = compare(part, stored)
        record_result(scenario, transport, comparison, recovery_s)
        results[transport] = comparison
    return results


def assert_nothing_lost(results: Mapping[str, Comparison], transports: Iterable[str]) -> None:
    """Every transport acknowledged something, lost nothing, duplicated nothing and
    ran the handler of everything stored."""
    for transport in transports:
        assert transport in results, f"no {transport} device was ever acknowledged"
    problems = {t: describe(c) for t, c in results.items() if not c.ok or c.acknowledged == 0}
    assert not problems, f"lost or duplicated messages: {problems}"
