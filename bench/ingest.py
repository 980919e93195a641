"""`python -m bench ingest`: end-to-end ingest of the hub and of the hand-written baseline.

Layer: benchmarks; may import anything.

One run measures two systems one after the other, each on a fresh RabbitMQ
vhost and a fresh database, with the same simulated fleet:

- hub: `hub run --no-worker` as its own process (bench.hub_process), one
  `celery -A tasks worker`, the fleet (bench.fleet_runner) as a third process;
- baseline: the server a user would write by hand (bench.baseline_tcp, or
  bench.baseline_mqtt behind a Mosquitto of its own), one
  `celery -A bench.baseline_tasks worker` with the same options, the same fleet;
- or, with `against="rabbitmq-mqtt"`, instead of the baseline: RabbitMQ's own
  MQTT plugin on a private node, the same fleet (bench.rabbitmq_mqtt).

For each it records what the devices saw (messages acknowledged per second),
what the workers stored (rows in the database, waited for until every
acknowledged message is stored), the device-to-stored latency (bench.rows),
the CPU seconds of every process from the fleet's start to the last row, and
the server's memory. docs/benchmarks.md explains the method.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine, delete, insert

from bench import rows
from bench.services import (
    LOCALHOST,
    BenchError,
    Child,
    QueueProbe,
    Vhost,
    child_env,
    free_port,
    log,
    port_open,
    rabbitmq_process,
    raise_fd_limit,
    wait_until,
)

#: The project's targets, reported against (never asserted).
TARGET_STORED_PER_S = {"tcp": 20_000, "mqtt": 10_000}
TARGET_RATIO = 5.0


@dataclass
class IngestConfig:
    """Everything one ingest run depends on; recorded in its JSON output."""

    transport: str = "tcp"
    devices: int = 50
    duration_s: float | None = 20.0
    messages: int | None = None
    rate: float = 0.0
    window: int = 64
    qos: int = 1
    #: Celery's own default: as many pool processes as CPUs.
    worker_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    worker_pool: str = "prefork"
    #: The hub's `event_loop` setting; what it really ran on is reported apart.
    loop: str = "auto"
    #: MQTT: the simulator's raw-socket publishers (firmware_sim.lean_mqtt), not paho.
    lean: bool = True
    #: "rabbitmq-mqtt": measure RabbitMQ's MQTT plugin instead of the baseline.
    against: str | None = None
    database_url: str | None = None
    baseline: bool = True
    baseline_confirms: bool = True
    batch_max_messages: int | None = None
    batch_window_ms: float | None = None
    drain_timeout_s: float = 300.0
    profile_path: str | None = None
    profile_worker_path: str | None = None
    profile_gil: bool = False
    quiet: bool = False
    systems: list[str] = field(default_factory=lambda: ["hub", "baseline"])


# ---------------------------------------------------------------------------
# Preparing a system: database, devices, processes
# ---------------------------------------------------------------------------


def _database_url(cfg: IngestConfig, folder: Path, name: str) -> str:
    return cfg.database_url or f"sqlite:///{folder / (name + '.sqlite3')}"


def make_credentials(prefix: str, count: int) -> dict[str, str]:
    return {f"{prefix}{n}": secrets.token_urlsafe(16) for n in range(1, count + 1)}


def _hashes(credentials: dict[str, str]) -> dict[str, str]:
    from hub.registry import hash_credential

    return {device_id: hash_credential(c) for device_id, c in credentials.items()}


def provision_hub(url: str, credentials: dict[str, str]) -> None:
    """Migrate the hub's database and register the devices in one transaction."""
    from hub.storage import Device, make_engine, migrate

    migrate(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(Device),
                [
                    {"id": device_id, "credential_sha256": digest, "created_at": now}
                    for device_id, digest in _hashes(credentials).items()
                ],
            )
    finally:
        engine.dispose()


def remove_hub_rows(url: str, prefix: str) -> None:
    """Delete one run's rows from a shared (PostgreSQL) database."""
    from hub.storage import Device, DeviceState, EventRow, TelemetryRow, make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for model in (TelemetryRow, EventRow, DeviceState):
                conn.execute(delete(model).where(model.device_id.startswith(prefix)))
            conn.execute(delete(Device).where(Device.id.startswith(prefix)))
    finally:
        engine.dispose()


def start_hub(
    cfg: IngestConfig,
    folder: Path,
    broker_url: str,
    database_url: str,
    *,
    mqtt: bool,
    env: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
) -> tuple[Child, dict[str, int]]:
    """`hub run --no-worker` on free ports, or on `ports` ("tcp", "mqtt",
    "http": a hub started again where the devices know it), with more `HUB_*`
    variables in `env`; the process and its ports by listener name."""
    env = {
        # Every simulated device connects from the same loopback address: the
        # limits per source address would measure themselves, not the hub.
        "HUB_MAX_CONNECTS_PER_ADDRESS_PER_S": "0",
        "HUB_MAX_CONNECTIONS_PER_ADDRESS": "0",
        # Off, not on the default ports 8083/8084 that another hub may hold.
        "HUB_MQTT_WS_PORT": "0",
        "HUB_MQTT_WSS_PORT": "0",
        **(env or {}),
        "HUB_BROKER_URL": broker_url,
        "HUB_DATABASE_URL": database_url,
        "HUB_DATA_DIR": str(folder / "hub-data"),
    }
    if cfg.batch_max_messages is not None:
        env["HUB_BATCH_MAX_MESSAGES"] = str(cfg.batch_max_messages)
    if cfg.batch_window_ms is not None:
        env["HUB_BATCH_WINDOW_MS"] = str(cfg.batch_window_ms)
    argv = [
        sys.executable, "-m", "bench.hub_process", "--loop", cfg.loop,
        "run", "--no-worker", "--host", LOCALHOST,
        "--tcp-port", str((ports or {}).get("tcp", 0)),
        "--mqtt-port", str((ports or {}).get("mqtt", 0)),
        "--http-port", str((ports or {}).get("http", 0)),
    ]  # fmt: skip
    if not mqtt:
        argv.append("--no-mqtt")
    hub = Child("hub", argv, env=child_env(env), log_path=folder / "hub.log")
    try:
        hub.wait_for_log(r"Press Ctrl\+C to stop\.", timeout_s=60)
    except BaseException:
        hub.stop()
        raise
    ports = {
        m.group(1).split("/")[0]: int(m.group(2))  # e.g. "tcp/native" -> "tcp"
        for m in re.finditer(r"^\s+(\S+)\s+127\.0\.0\.1:(\d+)", hub.log_text(), re.MULTILINE)
    }
    return hub, ports


def hub_event_loop(hub: Child) -> str | None:
    """The event loop the hub says it runs on (its startup line `loop`)."""
    match = re.search(r"^\s+loop\s+(\S+)\s*$", hub.log_text(), re.MULTILINE)
    return match.group(1) if match else None


def start_worker(
    label: str,
    app: str,
    queue: str,
    env: dict[str, str],
    cfg: IngestConfig,
    folder: Path,
    probe: QueueProbe,
) -> Child:
    """One `celery -A <app> worker`, returned once it consumes `queue`."""
    from tasks.worker import celery_worker_command

    argv = celery_worker_command(
        app=app,
        concurrency=cfg.worker_concurrency,
        pool=cfg.worker_pool,
        queues=[queue],
        heartbeat=False,
        hostname=f"bench-{label}-{uuid.uuid4().hex[:8]}@%h",
    )
    worker = Child(f"{label} worker", argv, env=child_env(env), log_path=folder / "worker.log")
    try:

        def consuming() -> bool:
            worker.check_alive()
            found = probe.depth(queue)
            return found is not None and found[1] >= 1

        wait_until(consuming, 90, f"the {label} worker to consume {queue}", interval_s=0.3)
    except BaseException:
        worker.stop()
        raise
    return worker


def start_mosquitto(folder: Path) -> tuple[Child, int]:
    """A Mosquitto of the baseline's own on a free port of 127.0.0.1, queues unbounded."""
    binary = shutil.which("mosquitto")
    if binary is None:
        raise BenchError(
            "the MQTT baseline needs the mosquitto binary (Debian: apt-get install mosquitto)"
        )
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {LOCALHOST}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # Unbounded per-client queue: the slow subscriber must not lose messages.
        "max_queued_messages 0\n"
        "max_queued_bytes 0\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n",
        "utf-8",
    )
    child = Child(
        "mosquitto", [binary, "-c", str(conf)], env=child_env(), log_path=folder / "m.log"
    )

    def listening() -> bool:
        child.check_alive()
        return port_open(LOCALHOST, port)

    try:
        wait_until(listening, 20, "mosquitto to listen")
    except BaseException:
        child.stop()
        raise
    return child, port


# ---------------------------------------------------------------------------
# Measuring one system
# ---------------------------------------------------------------------------


@dataclass
class Roles:
    """The processes of one system whose CPU and memory are accounted, by role."""

    server: list[Child]
    worker: Child
    #: The hub's status port, to read its dispatch metrics.
    http_port: int | None = None


class Sampler:
    """CPU seconds by role (and of the whole machine) and the servers' peak RSS."""

    def __init__(self, roles: Roles) -> None:
        self.roles = roles
        self._rabbitmq = rabbitmq_process()
        self.rss_start = self.rss()
        self.rss_peak = self.rss_start
        self._before = self._cpu()
        self._writes_before = self.write_syscalls()

    def write_syscalls(self) -> int | None:
        """write/send system calls of the server processes so far (Linux /proc io)."""
        total = 0
        for server in self.roles.server:
            try:
                total += int(server.ps.io_counters().write_count)
            except (psutil.Error, AttributeError, NotImplementedError):
                return None
        return total

    def write_syscalls_used(self) -> int | None:
        after = self.write_syscalls()
        if after is None or self._writes_before is None:
            return None
        return after - self._writes_before

    def rss(self) -> int:
        return sum(s.rss() for s in self.roles.server)

    def sample_rss(self) -> None:
        self.rss_peak = max(self.rss_peak, self.rss())

    def _cpu(self) -> dict[str, float]:
        values = {
            "server": sum(s.cpu_s() for s in self.roles.server),
            "worker": self.roles.worker.cpu_s(),
        }
        if self._rabbitmq is not None:
            with contextlib.suppress(psutil.Error):
                t = self._rabbitmq.cpu_times()
                values["rabbitmq"] = t.user + t.system
        machine = psutil.cpu_times()
        values["machine"] = machine.user + machine.system + getattr(machine, "nice", 0.0)
        return values

    def cpu_used(self, fleet_cpu_s: float) -> dict[str, float]:
        """CPU seconds since the sampler was made; "others" is the rest of the machine."""
        after = self._cpu()
        # A process that went away (a node stopped) has no "after": leave it out.
        cpu = {k: round(after[k] - self._before[k], 2) for k in self._before if k in after}
        cpu["fleet"] = fleet_cpu_s
        ours = cpu["server"] + cpu["worker"] + cpu["fleet"] + cpu.get("rabbitmq", 0.0)
        cpu["others"] = round(max(cpu.pop("machine") - ours, 0.0), 2)
        return cpu


def fleet_argv(cfg: IngestConfig, port: int, credentials_file: Path, topic_root: str) -> list[str]:
    """The command line of the fleet process (bench.fleet_runner) for `cfg`."""
    argv = [
        sys.executable, "-m", "bench.fleet_runner", "--transport", cfg.transport,
        "--host", LOCALHOST, "--port", str(port), "--credentials", str(credentials_file),
        "--rate", str(cfg.rate), "--window", str(cfg.window), "--qos", str(cfg.qos),
        "--topic-root", topic_root, "--drain-timeout", "60", "--give-up", "60",
    ]  # fmt: skip
    if cfg.transport == "mqtt" and cfg.lean:
        argv.append("--lean")
    if cfg.messages is not None:
        argv += ["--messages", str(cfg.messages)]
    else:
        argv += ["--duration", str(cfg.duration_s)]
    return argv


def _progress_printer(label: str, probe: Callable[[], str], quiet: bool) -> Callable[[str], None]:
    def show(line: str) -> None:
        if quiet or not line.startswith("{"):
            return
        record = json.loads(line)
        if record.get("type") == "progress":
            log(
                f"{label}: {record['elapsed_s']:6.1f}s online {record['online']} "
                f"sent {record['sent']} acked {record['acknowledged']} "
                f"({record['rate_per_s']:.0f}/s) errors {record['errors']}{probe()}"
            )
        elif record.get("type") == "online":
            log(f"{label}: every device connected after {record['elapsed_s']:.2f} s")

    return show


def _metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _hub_metrics(http_port: int | None) -> dict[str, float | None]:
    if http_port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    batches = _metric(text, "hub_batches_published_total")
    envelopes = _metric(text, "hub_envelopes_published_total")
    return {
        "batches_published": batches,
        "envelopes_published": envelopes,
        "mean_batch_size": round(envelopes / batches, 1) if batches and envelopes else None,
    }


def _start_profiler(
    pid: int, output: str, cfg: IngestConfig, folder: Path, *, subprocesses: bool = False
) -> Child:
    """py-spy sampling `pid` for the fleet's duration, collapsed stacks to `output`."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(binary).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    seconds = int(cfg.duration_s) if cfg.duration_s else 20
    argv = [
        binary, "record", "--pid", str(pid), "--rate", "200", "--duration", str(seconds),
        "--threads", "--format", "raw", "--nonblocking", "--output", str(Path(output).resolve()),
    ]  # fmt: skip
    if subprocesses:
        argv.append("--subprocesses")
    if cfg.profile_gil:
        argv.append("--gil")
    return Child(f"py-spy {pid}", argv, env=child_env(), log_path=folder / f"py-spy-{pid}.log")


class _Queue:
    """The system's task queue depth for progress lines (read from two threads)."""

    def __init__(self, probe: QueueProbe, name: str) -> None:
        self._probe = probe
        self._name = name
        self._lock = threading.Lock()

    def text(self) -> str:
        with self._lock:
            found = self._probe.depth(self._name)
        return f" queued {found[0]}" if found else ""


def _run_fleet(label: str, cfg: IngestConfig, fleet: Child, sampler: Sampler) -> dict[str, Any]:
    """Wait for the fleet to finish, watching the servers; its summary record."""
    servers = sampler.roles.server
    bound_s = (cfg.duration_s or 0) + 3600
    deadline = time.monotonic() + bound_s
    while fleet.alive():
        for server in servers:
            server.check_alive()
        sampler.sample_rss()
        if time.monotonic() > deadline:
            raise BenchError(f"the {label} fleet ran for more than {bound_s:g} s")
        time.sleep(0.5)
    fleet.wait(30)
    result = next((r for r in reversed(fleet.json_lines()) if r.get("type") == "result"), None)
    if result is None:
        raise BenchError(f"the {label} fleet ended without a result:\n{fleet.log_tail()}")
    summary = result["summary"]
    if not summary["connected"]:
        raise BenchError(
            f"no device could connect to the {label}; the end of its log:\n"
            + "\n".join(s.log_tail(2000) for s in servers)
        )
    if summary["errors"] or summary["refused"]:
        log(f"{label}: the fleet counted {summary['errors']} errors and "
            f"{summary['refused']} refusals")  # fmt: skip
    return dict(result)


def _wait_stored(
    label: str,
    cfg: IngestConfig,
    expected: int,
    count: Callable[[], int],
    worker: Child,
    queue: _Queue,
    limit_s: float,
) -> None:
    """Wait until `count()` reaches `expected`, at most `limit_s`, with progress lines."""
    started = time.monotonic()
    last_report = 0.0
    while (stored := count()) < expected:
        now = time.monotonic()
        if now - started > limit_s:
            log(
                f"{label}: {expected - stored} acknowledged messages not stored "
                f"{limit_s:g} s after the fleet stopped; measuring what is there"
            )
            return
        worker.check_alive()
        if not cfg.quiet and now - last_report >= 2.0:
            last_report = now
            log(f"{label}: waiting for the workers: stored {stored}/{expected}{queue.text()}")
        time.sleep(0.5)


def measure(
    label: str,
    cfg: IngestConfig,
    roles: Roles,
    fleet_argv: list[str],
    folder: Path,
    storage: tuple[Engine, str, str],
    queue_probe: tuple[QueueProbe, str],
    *,
    profile: bool = False,
    drain_limit_s: float | None = None,
) -> dict[str, Any]:
    """Run the fleet against a started system and measure it (see the module doc).

    `storage` is (engine, table, device id prefix) of the rows to count, and
    `queue_probe` the probe and name of the system's task queue. After the
    fleet stopped, waits until every acknowledged message is stored, at most
    `drain_limit_s` (default: the configured drain timeout).
    """
    engine, table, prefix = storage
    queue = _Queue(*queue_probe)
    sampler = Sampler(roles)
    fleet = Child(
        f"{label} fleet", fleet_argv, env=child_env(), log_path=folder / "fleet.log",
        read_stdout=True, on_line=_progress_printer(label, queue.text, cfg.quiet),
    )  # fmt: skip
    profilers: list[Child] = []
    try:
        if profile and cfg.profile_path:
            profilers.append(_start_profiler(roles.server[0].pid, cfg.profile_path, cfg, folder))
        if profile and cfg.profile_worker_path:
            worker_pid = roles.worker.pid
            output = cfg.profile_worker_path
            profilers.append(_start_profiler(worker_pid, output, cfg, folder, subprocesses=True))
        result = _run_fleet(label, cfg, fleet, sampler)
        summary = result["summary"]
        acknowledged = int(summary["acknowledged"])
        _wait_stored(
            label, cfg, acknowledged, lambda: rows.count(engine, table, prefix), roles.worker,
            queue, cfg.drain_timeout_s if drain_limit_s is None else drain_limit_s,
        )  # fmt: skip
        sampler.sample_rss()
        cpu = sampler.cpu_used(float(result["cpu_s"]))
        writes = sampler.write_syscalls_used()
        metrics = _hub_metrics(roles.http_port)
        for profiler in profilers:
            with contextlib.suppress(BenchError):
                profiler.wait(60)
    finally:
        fleet.stop()
        for profiler in profilers:
            profiler.stop()

    stats = rows.stored_stats(engine, table, prefix)
    started_at = float(result["started_at"])
    stored_span = (stats["last_stored_at"] or started_at) - started_at
    n = max(stats["rows"], 1)
    sent = int(summary["sent"])
    duration = float(summary["duration_s"])
    return {
        "system": label,
        "devices": summary["devices"],
        "connected": summary["connected"],
        "sent": sent,
        "acknowledged": acknowledged,
        "stored": stats["rows"],
        "all_stored": sent > 0 and stats["rows"] == sent and acknowledged == sent,
        "errors": summary["errors"],
        "refused": summary["refused"],
        "fleet_duration_s": duration,
        "acked_per_s": round(acknowledged / duration, 1) if duration else 0.0,
        "stored_per_s": round(stats["rows"] / stored_span, 1) if stored_span > 0 else 0.0,
        "stored_span_s": round(stored_span, 2),
        "latency_ms": stats["latency_ms"],
        "stored_timeline": stats["timeline"],
        "cpu_s": cpu,
        "cpu_us_per_message": {
            role: round(cpu[role] / n * 1e6, 1) for role in ("server", "worker", "fleet")
        },
        # Fewer writes per message is what coalescing ACKs buys (one per batch).
        "server_write_syscalls_per_message": round(writes / n, 3) if writes is not None else None,
        "server_rss_mb": {
            "start": round(sampler.rss_start / 2**20, 1),
            "peak": round(sampler.rss_peak / 2**20, 1),
        },
        **({"dispatch": metrics} if metrics else {}),
    }


# ---------------------------------------------------------------------------
# The two systems
# ---------------------------------------------------------------------------


def run_hub(cfg: IngestConfig, folder: Path) -> dict[str, Any]:
    from hub.envelope import Kind
    from hub.routing import QUEUES
    from hub.storage import make_engine

    folder.mkdir(parents=True)
    prefix = f"h{uuid.uuid4().hex[:6]}-"
    credentials = make_credentials(prefix, cfg.devices)
    credentials_file = folder / "credentials.json"
    credentials_file.write_text(json.dumps(credentials), "utf-8")
    database_url = _database_url(cfg, folder, "hub")
    queue = QUEUES[Kind.TELEMETRY]
    with contextlib.ExitStack() as stack:
        if not cfg.quiet:
            log("hub: preparing a vhost, the database and a worker")
        vhost = stack.enter_context(Vhost("hub"))
        provision_hub(database_url, credentials)
        if cfg.database_url:
            stack.callback(remove_hub_rows, database_url, prefix)
        probe = QueueProbe(vhost.url)
        stack.callback(probe.close)
        worker_env = {
            "HUB_BROKER_URL": vhost.url,
            "HUB_DATABASE_URL": database_url,
            "HUB_DATA_DIR": str(folder / "worker-data"),
        }
        worker = start_worker("hub", "tasks", queue, worker_env, cfg, folder, probe)
        stack.callback(worker.stop)
        hub, ports = start_hub(cfg, folder, vhost.url, database_url, mqtt=cfg.transport == "mqtt")
        stack.callback(hub.stop)
        device_port = ports["tcp"] if cfg.transport == "tcp" else ports["mqtt"]
        if not cfg.quiet:
            log(f"hub: running on {LOCALHOST}:{device_port}; starting {cfg.devices} devices")
        roles = Roles(server=[hub], worker=worker, http_port=ports.get("http"))
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        measured = measure(
            "hub", cfg, roles, fleet_argv(cfg, device_port, credentials_file, "devices"),
            folder, (engine, "telemetry", prefix if cfg.database_url else ""), (probe, queue),
            profile=True,
        )  # fmt: skip
        measured["event_loop"] = hub_event_loop(hub)
        return measured
    raise AssertionError("unreachable")  # pragma: no cover


def run_baseline(cfg: IngestConfig, folder: Path) -> dict[str, Any]:
    from bench import baseline_tasks

    folder.mkdir(parents=True)
    prefix = f"b{uuid.uuid4().hex[:6]}-"
    credentials = make_credentials(prefix, cfg.devices)
    credentials_file = folder / "credentials.json"
    credentials_file.write_text(json.dumps(credentials), "utf-8")
    hashes_file = folder / "hashes.json"
    hashes_file.write_text(json.dumps(_hashes(credentials)), "utf-8")
    database_url = _database_url(cfg, folder, "baseline")
    queue = baseline_tasks.QUEUE
    with contextlib.ExitStack() as stack:
        if not cfg.quiet:
            log("baseline: preparing a vhost, the database and a worker")
        vhost = stack.enter_context(Vhost("baseline"))
        baseline_tasks.create_table(database_url)
        engine = baseline_tasks.make_engine(database_url)
        stack.callback(engine.dispose)
        if cfg.database_url:

            def remove_rows() -> None:
                with engine.begin() as conn:
                    conn.execute(
                        delete(baseline_tasks.readings).where(
                            baseline_tasks.readings.c.device_id.startswith(prefix)
                        )
                    )

            stack.callback(remove_rows)
        probe = QueueProbe(vhost.url)
        stack.callback(probe.close)
        env = {
            "BENCH_BASELINE_BROKER_URL": vhost.url,
            "BENCH_BASELINE_DATABASE_URL": database_url,
            "BENCH_BASELINE_CONFIRMS": "1" if cfg.baseline_confirms else "0",
        }
        worker = start_worker("baseline", "bench.baseline_tasks", queue, env, cfg, folder, probe)
        stack.callback(worker.stop)
        servers: list[Child] = []
        if cfg.transport == "tcp":
            argv = [
                sys.executable, "-m", "bench.baseline_tcp", "--port", "0",
                "--credentials", str(hashes_file), "--loop", cfg.loop,
            ]  # fmt: skip
            server = Child("baseline server", argv, env=child_env(env), log_path=folder / "s.log")
            stack.callback(server.stop)
            port = int(server.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)", 60).group(1))
            servers.append(server)
            topic_root = "devices"
        else:
            mosquitto, port = start_mosquitto(folder)
            stack.callback(mosquitto.stop)
            topic_root = f"bench{uuid.uuid4().hex[:6]}"
            argv = [
                sys.executable, "-m", "bench.baseline_mqtt", "--port", str(port),
                "--topic-root", topic_root, "--qos", str(cfg.qos),
            ]  # fmt: skip
            subscriber = Child(
                "baseline subscriber", argv, env=child_env(env), log_path=folder / "s.log"
            )
            stack.callback(subscriber.stop)
            subscriber.wait_for_log(r"^subscribed", 60)
            servers += [subscriber, mosquitto]
        if not cfg.quiet:
            log(f"baseline: running on {LOCALHOST}:{port}; starting {cfg.devices} devices")
        roles = Roles(server=servers, worker=worker)
        # The broker acknowledges MQTT devices at once, so the baseline's backlog
        # can grow far beyond what it stores in a reasonable time: its stored rate
        # is measured over the run plus a bounded drain.
        drain_limit = None
        if cfg.transport == "mqtt":
            drain_limit = min(cfg.drain_timeout_s, max(30.0, cfg.duration_s or 30.0))
        table = baseline_tasks.TABLE_NAME
        return measure(
            "baseline", cfg, roles, fleet_argv(cfg, port, credentials_file, topic_root),
            folder, (engine, table, prefix if cfg.database_url else ""), (probe, queue),
            drain_limit_s=drain_limit,
        )  # fmt: skip
    raise AssertionError("unreachable")  # pragma: no cover


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Run the hub (and the baseline) once; the JSON-able result."""
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    results: dict[str, Any] = {}
    try:
        if "hub" in cfg.systems:
            results["hub"] = run_hub(cfg, workdir / "hub")
        if cfg.against == "rabbitmq-mqtt":
            from bench.rabbitmq_mqtt import run_rabbitmq_mqtt

            results["rabbitmq-mqtt"] = run_rabbitmq_mqtt(cfg, workdir / "rabbitmq-mqtt")
        elif cfg.baseline and "baseline" in cfg.systems:
            results["baseline"] = run_baseline(cfg, workdir / "baseline")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {
        "benchmark": "ingest",
        "transport": cfg.transport,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("quiet", "systems")},
        **results,
    }
    hub, base = results.get("hub"), results.get("baseline")
    alternative = results.get("rabbitmq-mqtt")
    if hub and alternative:
        out["ratio_to_rabbitmq_mqtt"] = {
            "acked_per_s": _ratio(hub["acked_per_s"], alternative["acked_per_s"]),
            "stored_per_s": _ratio(hub["stored_per_s"], alternative["stored_per_s"]),
        }
    if hub and base:
        out["ratio"] = {
            "acked_per_s": _ratio(hub["acked_per_s"], base["acked_per_s"]),
            "stored_per_s": _ratio(hub["stored_per_s"], base["stored_per_s"]),
        }
    if hub and not cfg.rate:
        # The targets are about capacity: a paced run (--rate) does not measure it.
        target = TARGET_STORED_PER_S[cfg.transport]
        out["targets"] = {
            "stored_per_s": target,
            "stored_per_s_met": hub["stored_per_s"] >= target,
            "ratio": TARGET_RATIO,
            "ratio_met": (
                out["ratio"]["stored_per_s"] is not None
                and out["ratio"]["stored_per_s"] >= TARGET_RATIO
            )
            if "ratio" in out
            else None,
            "rabbitmq_mqtt_met": out["ratio_to_rabbitmq_mqtt"]["stored_per_s"] >= 1.0
            if out.get("ratio_to_rabbitmq_mqtt", {}).get("stored_per_s") is not None
            else None,
        }
    return out


def machine_info() -> dict[str, Any]:
    import platform

    return {
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_1m": round(psutil.getloadavg()[0], 2),
    }
