"""`bench ingest --transport mqtt --against rabbitmq-mqtt`: RabbitMQ's own MQTT plugin.

Layer: benchmarks; may import anything.

The alternative a user would weigh the hub against: devices publishing
straight into RabbitMQ through its `rabbitmq_mqtt` plugin, with no hub. The
run starts a private RabbitMQ node in a temporary folder, never the machine's
shared one:

- its own node name (`benchmq-<pid>@localhost`), AMQP, distribution and MQTT
  ports (free ones of 127.0.0.1), mnesia and log folders, and an enabled
  plugins file holding `[rabbitmq_mqtt].`;
- definitions loaded at boot: the same devices with the same credentials as
  the hub run (each device authenticates, as on the hub), and one durable
  queue bound to the plugin's exchange `amq.topic` with the routing key
  `<root>.*.telemetry` (the plugin maps the topic separator `/` to `.`).

The same load generator (bench.fleet_runner, lean publishers by default), at
the same QoS and window, publishes to it. At QoS 1 the plugin sends PUBACK
once the queue has the message (publisher confirms inside the broker), which
is what the hub's PUBACK means too. "Stored" here is messages in that durable
queue (read with a passive declare), counted until it holds every
acknowledged message. The node is stopped with `rabbitmqctl -n <node> stop`
and its folder removed at the end, also on Ctrl+C or an error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.services import (
    LOCALHOST,
    BenchError,
    Child,
    QueueProbe,
    child_env,
    free_port,
    log,
    port_open,
    process_cpu_s,
    process_rss,
    wait_until,
)

QUEUE = "bench-mqtt-telemetry"
_NEEDS_RABBITMQ = (
    "--against rabbitmq-mqtt starts a private RabbitMQ node with rabbitmq-server and "
    "rabbitmqctl, which are not on PATH (Debian: apt-get install rabbitmq-server)"
)


def password_hash(password: str) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256` hash of `password`, for a
    definitions file: base64(salt + sha256(salt + password)) with a 4-byte salt."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(credentials: dict[str, str], topic_root: str) -> dict[str, Any]:
    """Users (the devices and guest), their permissions, the queue and its binding."""
    users = {"guest": "guest", **credentials}
    return {
        "vhosts": [{"name": "/"}],
        "users": [
            {
                "name": name,
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"] if name == "guest" else [],
            }
            for name, password in users.items()
        ],
        "permissions": [
            {"user": name, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
            for name in users
        ],
        "queues": [
            {"name": QUEUE, "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}
        ],
        "bindings": [
            {
                "source": "amq.topic",
                "vhost": "/",
                "destination": QUEUE,
                "destination_type": "queue",
                # MQTT topic devices/<id>/telemetry is routing key devices.<id>.telemetry.
                "routing_key": f"{topic_root}.*.telemetry",
                "arguments": {},
            }
        ],
    }


class PrivateRabbitMQ:
    """A RabbitMQ node of the run's own with the MQTT plugin (`with PrivateRabbitMQ(...)`).

    Run as root, `rabbitmq-server` switches to the `rabbitmq` user, so the
    node's folder is a temporary folder of its own handed to that user.
    """

    def __init__(self, credentials: dict[str, str], topic_root: str) -> None:
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            raise BenchError(_NEEDS_RABBITMQ)
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.mqtt_port = free_port()
        self.name = f"benchmq-{os.getpid()}@localhost"
        self.folder = Path(tempfile.mkdtemp(prefix="bench-rabbitmq-"))
        self.folder.chmod(0o755)
        self.pid: int | None = None
        self._credentials = credentials
        self._topic_root = topic_root

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOCALHOST}:{self.amqp_port}//"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS=LOCALHOST,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.folder / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.folder / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.folder / "rabbitmq.conf"),
            RABBITMQ_PID_FILE=str(self.folder / "rabbitmq.pid"),
        )
        return env

    def _write_files(self) -> None:
        (self.folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", "utf-8")
        defs = self.folder / "definitions.json"
        defs.write_text(json.dumps(definitions(self._credentials, self._topic_root)), "utf-8")
        (self.folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {LOCALHOST}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {LOCALHOST}:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = false\n"
            f"load_definitions = {defs}\n"
            "loopback_users = none\n"
            # A benchmark fills little disk; do not block publishers on a small machine.
            "disk_free_limit.absolute = 50MB\n",
            "utf-8",
        )
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam("rabbitmq")
                for path in [self.folder, *self.folder.rglob("*")]:
                    os.chown(path, user.pw_uid, user.pw_gid)

    def __enter__(self) -> PrivateRabbitMQ:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, timeout_s: float = 120.0) -> None:
        self._write_files()
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        pid_file = self.folder / "rabbitmq.pid"

        def ready() -> bool:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int(pid_file.read_text().strip())
            return (
                self.pid is not None
                and port_open(LOCALHOST, self.amqp_port)
                and port_open(LOCALHOST, self.mqtt_port)
            )

        try:
            wait_until(ready, timeout_s, f"the private RabbitMQ node {self.name}", 0.5)
        except BenchError as exc:
            raise BenchError(f"{exc}; the end of its log:\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 2000) -> str:
        logs = sorted((self.folder / "log").glob("*.log"))
        return "".join(p.read_text("utf-8", "replace")[-chars:] for p in logs)

    def process(self) -> psutil.Process | None:
        if self.pid is None:
            return None
        try:
            return psutil.Process(self.pid)
        except psutil.Error:
            return None

    def alive(self) -> bool:
        proc = self.process()
        try:
            return proc is not None and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def close(self) -> None:
        """Stop the node (`rabbitmqctl -n NODE stop`, then SIGKILL) and remove its folder."""
        try:
            if self.pid is None:
                with contextlib.suppress(OSError, ValueError):
                    self.pid = int((self.folder / "rabbitmq.pid").read_text().strip())
            if self.alive():
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    subprocess.run(
                        ["rabbitmqctl", "-q", "-n", self.name, "stop"], env=self._env(),
                        capture_output=True, timeout=60, check=False,
                    )  # fmt: skip
                with contextlib.suppress(BenchError):
                    wait_until(lambda: not self.alive(), 30, "the node to stop", 0.3)
            proc = self.process()
            if proc is not None and self.alive():
                log(f"RabbitMQ node {self.name} did not stop; killing it")
                with contextlib.suppress(psutil.Error):
                    for child in proc.children(recursive=True):
                        child.kill()
                    proc.kill()
        finally:
            self.pid = None
            shutil.rmtree(self.folder, ignore_errors=True)


class _DepthWatch:
    """Polls the queue depth in a thread; remembers when it last grew."""

    def __init__(self, url: str) -> None:
        self._probe = QueueProbe(url)
        self.depth = 0
        #: The queue answered at least once (the probe is this thread's alone).
        self.seen = False
        self.last_growth_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-depth", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            found = self._probe.depth(QUEUE)
            if found is not None:
                self.seen = True
            if found is not None and found[0] > self.depth:
                self.depth = found[0]
                self.last_growth_at = time.time()
            self._stop.wait(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._probe.close()


def run_rabbitmq_mqtt(cfg: Any, folder: Path) -> dict[str, Any]:
    """The fleet of `cfg` (an IngestConfig) against a private node; its figures."""
    from bench.ingest import fleet_argv, make_credentials

    folder.mkdir(parents=True)
    prefix = f"r{secrets.token_hex(3)}-"
    credentials = make_credentials(prefix, cfg.devices)
    credentials_file = folder / "credentials.json"
    credentials_file.write_text(json.dumps(credentials), "utf-8")
    topic_root = "devices"
    if not cfg.quiet:
        log("rabbitmq-mqtt: starting a private RabbitMQ node with the MQTT plugin")
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(PrivateRabbitMQ(credentials, topic_root))
        node_proc = node.process()
        if node_proc is None:
            raise BenchError(f"the private RabbitMQ node {node.name} has no process")
        watch = _DepthWatch(node.url)
        stack.callback(watch.close)
        wait_until(lambda: watch.seen, 30, f"the queue {QUEUE}")
        if not cfg.quiet:
            log(
                f"rabbitmq-mqtt: node {node.name}, MQTT on {LOCALHOST}:{node.mqtt_port}; "
                f"starting {cfg.devices} devices"
            )
        cpu_before = process_cpu_s(node_proc)
        rss_start = process_rss(node_proc, tree=True)
        rss_peak = rss_start
        fleet = Child(
            "rabbitmq-mqtt fleet",
            fleet_argv(cfg, node.mqtt_port, credentials_file, topic_root),
            env=child_env(), log_path=folder / "fleet.log", read_stdout=True,
        )  # fmt: skip
        stack.callback(fleet.stop)
        bound_s = (cfg.duration_s or 0) + 3600
        deadline = time.monotonic() + bound_s
        while fleet.alive():
            if not node.alive():
                raise BenchError(f"the private RabbitMQ node stopped:\n{node.log_tail()}")
            rss_peak = max(rss_peak, process_rss(node_proc, tree=True))
            if time.monotonic() > deadline:
                raise BenchError(f"the rabbitmq-mqtt fleet ran for more than {bound_s:g} s")
            time.sleep(0.5)
        fleet.wait(30)
        result = next((r for r in reversed(fleet.json_lines()) if r.get("type") == "result"), None)
        if result is None:
            raise BenchError(f"the rabbitmq-mqtt fleet ended without a result:\n{fleet.log_tail()}")
        summary = result["summary"]
        acknowledged = int(summary["acknowledged"])
        # The queue has every acknowledged message already; give the poller time to see it.
        with contextlib.suppress(BenchError):
            wait_until(lambda: watch.depth >= acknowledged, 30, "the queue to hold every message")
        time.sleep(0.3)
        if watch.depth < acknowledged or summary["errors"]:
            # The node's folder goes at the end: keep what it said about it.
            log(f"rabbitmq-mqtt: not every message arrived; the node's log ends:\n"
                f"{node.log_tail(3000)}")  # fmt: skip
        cpu = {"server": round(process_cpu_s(node_proc) - cpu_before, 2)}
        cpu["fleet"] = float(result["cpu_s"])
        stored = watch.depth
        started_at = float(result["started_at"])
        span = max(watch.last_growth_at - started_at, 1e-9)
        duration = float(summary["duration_s"])
        n = max(stored, 1)
        sent = int(summary["sent"])
        return {
            "system": "rabbitmq-mqtt",
            "node": node.name,
            "devices": summary["devices"],
            "connected": summary["connected"],
            "sent": sent,
            "acknowledged": acknowledged,
            "stored": stored,
            "all_stored": sent > 0 and stored >= sent and acknowledged == sent,
            "errors": summary["errors"],
            "refused": summary["refused"],
            "fleet_duration_s": duration,
            "acked_per_s": round(acknowledged / duration, 1) if duration else 0.0,
            "stored_per_s": round(stored / span, 1) if stored else 0.0,
            "stored_span_s": round(span, 2),
            "cpu_s": cpu,
            "cpu_us_per_message": {role: round(cpu[role] / n * 1e6, 1) for role in cpu},
            "server_rss_mb": {
                "start": round(rss_start / 2**20, 1),
                "peak": round(rss_peak / 2**20, 1),
            },
            "event_loop": None,
        }
    raise AssertionError("unreachable")  # pragma: no cover
