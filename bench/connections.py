"""`python -m bench connections`: how many idle device connections one hub process holds.

Layer: benchmarks; may import anything.

For each transport, on a fresh hub process (`hub run --no-worker`, RabbitMQ
vhost of its own, SQLite database with the devices registered):

1. measure the hub's RSS once it is idle;
2. start the fleet (bench.fleet_runner, its own process) with every device
   lingering: TCP devices send HELLO and then only keep-alive PINGs, MQTT
   devices CONNECT with their credentials and SUBSCRIBE to their command
   topic (paho, or `--lean`: firmware_sim.lean_mqtt's raw-socket clients);
   record how long it takes until every device is connected (and
   subscribed);
3. hold the fleet for `--hold` seconds, then read the hub's RSS and how many
   devices the hub itself reports connected (its /status endpoint);
4. RSS per connection = (RSS connected - RSS idle) / devices.

With `--restart`, the hub is then stopped and started again on the same
ports while the fleet stays up: every device loses its connection at once and
reconnects (the device's backoff: 0.2 s doubling to 5 s, with jitter), and
the run records how long until the new hub holds every device again, from
the stop and from the new hub's start, and its connect errors meanwhile.

With `--publish-probe S` (MQTT), a small fleet of lean QoS 1 publishers
publishes as fast as it can for S seconds twice: on the idle hub, and while
the fleet is held; both rates (messages acknowledged per second, that is
confirmed by RabbitMQ) show what the connected, subscribed devices cost
publishing clients.

Each process started gets its open-file limit raised to the hard limit.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import (
    IngestConfig,
    hub_event_loop,
    machine_info,
    make_credentials,
    provision_hub,
    start_hub,
)
from bench.services import (
    LOCALHOST,
    BenchError,
    Child,
    Vhost,
    child_env,
    fd_limit,
    log,
    raise_fd_limit,
)

#: The project's targets, reported against (never asserted).
TARGET_KB_PER_TCP_CONNECTION = 8.0
TARGET_MQTT_CONNECT_S = 60.0
TARGET_DEVICES = 10_000


@dataclass
class ConnectionsConfig:
    """What one connections run does; recorded in its JSON output."""

    tcp: int = 2000
    mqtt: int = 2000
    hold_s: float = 10.0
    connect_rate: float | None = None
    connect_timeout_s: float = 300.0
    loop: str = "auto"
    quiet: bool = False
    #: MQTT devices are lean raw-socket clients subscribing to their command topic.
    lean: bool = False
    #: Seconds of the publish probe (0: none); its publishers.
    publish_probe_s: float = 0.0
    publish_probe_devices: int = 20
    #: Stop and start the hub while the fleet is held (the reconnection storm).
    restart: bool = False


def _status(http_port: int | None) -> dict[str, Any]:
    if http_port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{http_port}/status", timeout=10) as r:
            return dict(json.load(r))
    except (OSError, ValueError):
        return {}


def _publish_rate(port: int, credentials_file: Path, seconds: float) -> dict[str, Any]:
    """Lean QoS 1 publishers at full speed for `seconds`: what they got acknowledged."""
    argv = [
        sys.executable, "-m", "bench.fleet_runner", "--transport", "mqtt", "--lean",
        "--host", LOCALHOST, "--port", str(port), "--credentials", str(credentials_file),
        "--duration", str(seconds), "--window", "64", "--drain-timeout", "5",
    ]  # fmt: skip
    done = subprocess.run(
        argv, env=child_env(), capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = next((r for r in reversed(lines) if r.get("type") == "result"), None)
    if result is None:
        raise BenchError(f"the publish probe gave no result: {done.stderr[-2000:]}")
    summary = result["summary"]
    return {
        "seconds": summary["duration_s"],
        "acknowledged": summary["acknowledged"],
        "msg_per_s": summary["rate_per_s"],
        "fleet_cpu_s": result["cpu_s"],
    }


def _probe_with_cpu(
    hub: Child, fleet: Child | None, port: int, credentials_file: Path, seconds: float
) -> dict[str, Any]:
    """`_publish_rate`, with the CPU the hub spent per acknowledged message
    meanwhile and the CPU seconds of the held fleet's own process (on a
    machine of few CPUs, what the held devices' load generator takes from
    everything else)."""
    hub_before = hub.cpu_s()
    fleet_before = fleet.cpu_s() if fleet is not None else 0.0
    rate = _publish_rate(port, credentials_file, seconds)
    hub_s = hub.cpu_s() - hub_before
    rate["hub_cpu_us_per_msg"] = (
        round(hub_s / rate["acknowledged"] * 1e6, 1) if rate["acknowledged"] else None
    )
    rate["held_fleet_cpu_s"] = round(fleet.cpu_s() - fleet_before, 2) if fleet is not None else None
    return rate


def _last(child: Child, kind: str) -> dict[str, Any] | None:
    return next((r for r in reversed(child.json_lines()) if r.get("type") == kind), None)


#: Measures, while the fleet is held, new connections to a port: (port, a
#: device id and credential it may use) -> figures (bench.tls_connections).
Probe = Callable[[int, str, str], dict[str, Any]]


def measure_transport(
    transport: str,
    devices: int,
    cfg: ConnectionsConfig,
    folder: Path,
    broker_url: str,
    *,
    hub_env: dict[str, str] | None = None,
    fleet_args: tuple[str, ...] = (),
    probe: Probe | None = None,
) -> dict[str, Any]:
    """One fresh hub holding `devices` idle devices of `transport`: its memory and
    CPU; `hub_env` and `fleet_args` add to the hub's and the fleet's settings
    (TLS), and `probe`, when given, runs while the fleet is held."""
    folder.mkdir(parents=True)
    prefix = f"c{transport}-"
    credentials = make_credentials(prefix, devices)
    probe_device, probe_credential = f"{prefix}probe", secrets.token_urlsafe(16)
    credentials_file = folder / "credentials.json"
    credentials_file.write_text(json.dumps(credentials), "utf-8")
    publishers = (
        make_credentials(f"{prefix}pub-", cfg.publish_probe_devices)
        if cfg.publish_probe_s > 0 and transport == "mqtt"
        else {}
    )
    publishers_file = folder / "publishers.json"
    publishers_file.write_text(json.dumps(publishers), "utf-8")
    database_url = f"sqlite:///{folder / 'hub.sqlite3'}"
    provision_hub(database_url, {**credentials, **publishers, probe_device: probe_credential})
    published: dict[str, Any] = {}
    hub_cfg = IngestConfig(transport=transport, loop=cfg.loop)
    with contextlib.ExitStack() as stack:
        # Room for the fleet and the publish probe beyond the default limit.
        env = {"HUB_MQTT_MAX_CONNECTIONS": str(devices + len(publishers) + 1024), **(hub_env or {})}
        hub, ports = start_hub(
            hub_cfg, folder, broker_url, database_url, mqtt=transport == "mqtt", env=env
        )
        stack.callback(hub.stop)
        event_loop = hub_event_loop(hub)
        time.sleep(1.0)  # let the freshly started hub settle before the idle reading
        if publishers:
            published["idle"] = _probe_with_cpu(
                hub, None, ports[transport], publishers_file, cfg.publish_probe_s
            )
            if not cfg.quiet:
                log(f"{transport}: publish probe on the idle hub: "
                    f"{published['idle']['msg_per_s']:,.0f} msg/s")  # fmt: skip
        rss_idle = hub.rss()
        cpu_before = hub.cpu_s()
        bound_s = cfg.connect_timeout_s + cfg.hold_s + 120
        argv = [
            sys.executable, "-m", "bench.fleet_runner", "--transport", transport,
            "--host", LOCALHOST, "--port", str(ports[transport]),
            "--credentials", str(credentials_file), "--messages", "0", "--linger",
            "--duration", str(bound_s), "--give-up", str(cfg.connect_timeout_s),
            "--drain-timeout", "5", *fleet_args,
        ]  # fmt: skip
        if cfg.connect_rate:
            argv += ["--connect-rate", str(cfg.connect_rate)]
        if transport == "mqtt" and cfg.lean:
            argv += ["--lean", "--subscribe"]

        def show(line: str) -> None:
            if cfg.quiet or not line.startswith("{"):
                return
            record = json.loads(line)
            if record.get("type") == "progress":
                log(
                    f"{transport}: {record['elapsed_s']:6.1f}s connected "
                    f"{record['online']}/{devices} errors {record['errors']} "
                    f"refused {record['refused']}"
                )

        if not cfg.quiet:
            log(f"{transport}: connecting {devices} devices to the hub on port {ports[transport]}")
        fleet = Child(
            f"{transport} fleet", argv, env=child_env(), log_path=folder / "fleet.log",
            read_stdout=True, on_line=show,
        )  # fmt: skip
        stack.callback(fleet.stop)
        deadline = time.monotonic() + cfg.connect_timeout_s
        while _last(fleet, "online") is None and time.monotonic() < deadline:
            fleet.check_alive()
            hub.check_alive()
            time.sleep(0.2)
        online = _last(fleet, "online")
        if online is None:
            log(f"{transport}: not every device connected within {cfg.connect_timeout_s:g} s")
        elif not cfg.quiet:
            log(f"{transport}: all {devices} connected in {online['elapsed_s']:.2f} s; "
                f"holding them for {cfg.hold_s:g} s")  # fmt: skip
        hold_until = time.monotonic() + cfg.hold_s
        rss_peak = hub.rss()
        while time.monotonic() < hold_until:
            hub.check_alive()
            rss_peak = max(rss_peak, hub.rss())
            time.sleep(0.5)
        rss_connected = hub.rss()
        if publishers:
            published["held"] = _probe_with_cpu(
                hub, fleet, ports[transport], publishers_file, cfg.publish_probe_s
            )
            if not cfg.quiet:
                log(f"{transport}: publish probe with the fleet held: "
                    f"{published['held']['msg_per_s']:,.0f} msg/s")  # fmt: skip
        probed = None if probe is None else probe(ports[transport], probe_device, probe_credential)
        status = _status(ports.get("http"))
        held = (status.get("devices_connected") or {}).get(transport)
        progress = _last(fleet, "progress") or {}
        cpu_hub = hub.cpu_s() - cpu_before
        restarted = (
            _restart(hub, hub_cfg, folder, broker_url, database_url, transport, ports, env,
                     devices, cfg, fleet, stack)
            if cfg.restart
            else None
        )  # fmt: skip
        fleet.signal(15)
        with contextlib.suppress(BenchError):
            fleet.wait(60)
        result = _last(fleet, "result") or {}
        summary = result.get("summary", {})
    delta = max(rss_connected - rss_idle, 0)
    return {
        "devices": devices,
        "event_loop": event_loop,
        "connected": summary.get("connected", progress.get("connected", 0)),
        "online_after_hold": progress.get("online"),
        "held_by_hub": held,
        "connect_s": online["elapsed_s"] if online else None,
        "errors": summary.get("errors", progress.get("errors")),
        "refused": summary.get("refused", progress.get("refused")),
        "hub_rss_mb": {
            "idle": round(rss_idle / 2**20, 1),
            "connected": round(rss_connected / 2**20, 1),
            "peak": round(rss_peak / 2**20, 1),
        },
        "rss_kb_per_connection": round(delta / devices / 1024, 2),
        "hub_cpu_s": round(cpu_hub, 2),
        "fleet_cpu_s": result.get("cpu_s"),
        "fleet_max_rss_mb": round(result["max_rss_kb"] / 1024, 1) if result else None,
        **({} if probed is None else {"probe": probed}),
        **({"publish_probe": published} if published else {}),
        **({"restart": restarted} if restarted is not None else {}),
    }


def _restart(
    hub: Child,
    hub_cfg: IngestConfig,
    folder: Path,
    broker_url: str,
    database_url: str,
    transport: str,
    ports: dict[str, int],
    env: dict[str, str],
    devices: int,
    cfg: ConnectionsConfig,
    fleet: Child,
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    """Stop the hub, start it again on the same ports, and time the fleet's return."""
    errors_before = (_last(fleet, "progress") or {}).get("errors", 0)
    if not cfg.quiet:
        log(f"{transport}: stopping the hub with {devices} devices held, then starting it again")
    stopped_at = time.monotonic()
    hub.stop()
    again, _ = start_hub(
        hub_cfg,
        folder,  # the same data directory and log: the same hub, started again
        broker_url,
        database_url,
        mqtt=transport == "mqtt",
        env=env,
        ports={name: ports[name] for name in ("tcp", "mqtt", "http") if name in ports},
    )
    stack.callback(again.stop)
    started_at = time.monotonic()
    cpu_before = again.cpu_s()
    deadline = started_at + cfg.connect_timeout_s
    held, peak, back_at = 0, 0, None
    while time.monotonic() < deadline:
        again.check_alive()
        fleet.check_alive()
        held = (_status(ports.get("http")).get("devices_connected") or {}).get(transport) or 0
        peak = max(peak, again.rss())
        if held >= devices:
            back_at = time.monotonic()
            break
        time.sleep(0.2)
    if not cfg.quiet:
        log(
            f"{transport}: after the restart "
            + (
                f"all {devices} back {back_at - stopped_at:.1f} s after the stop"
                if back_at is not None
                else f"only {held} of {devices} back within {cfg.connect_timeout_s:g} s"
            )
        )
    return {
        "hub_down_s": round(started_at - stopped_at, 2),
        "all_back_s": None if back_at is None else round(back_at - stopped_at, 2),
        "all_back_after_start_s": None if back_at is None else round(back_at - started_at, 2),
        "held_by_hub": held,
        "connect_errors": ((_last(fleet, "progress") or {}).get("errors", 0) or 0)
        - (errors_before or 0),
        "hub_rss_peak_mb": round(peak / 2**20, 1),
        "hub_cpu_s": round(again.cpu_s() - cpu_before, 2),
    }


def run_connections(cfg: ConnectionsConfig) -> dict[str, Any]:
    soft = raise_fd_limit()
    needed = max(cfg.tcp, cfg.mqtt) + 1024
    if fd_limit() < needed or soft < needed:
        raise BenchError(
            f"the open-file limit ({soft}, hard {fd_limit()}) is below the {needed} this "
            "needs; raise the hard limit (ulimit -Hn, or LimitNOFILE) and run again"
        )
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-conn-"))
    results: dict[str, Any] = {}
    try:
        for transport, count in (("tcp", cfg.tcp), ("mqtt", cfg.mqtt)):
            if count <= 0:
                continue
            with Vhost(f"conn-{transport}") as vhost:
                results[transport] = measure_transport(
                    transport, count, cfg, workdir / transport, vhost.url
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    targets = []
    tcp, mqtt = results.get("tcp"), results.get("mqtt")
    if tcp:
        targets.append(
            {
                "text": f"{TARGET_DEVICES:,} TCP devices at <= {TARGET_KB_PER_TCP_CONNECTION:g} KB "
                "of hub memory each",
                "measured": f"{tcp['held_by_hub']} held, "
                f"{tcp['rss_kb_per_connection']:.2f} KB each",
                "met": bool(
                    tcp["devices"] >= TARGET_DEVICES
                    and tcp["held_by_hub"] == tcp["devices"]
                    and tcp["rss_kb_per_connection"] <= TARGET_KB_PER_TCP_CONNECTION
                ),
            }
        )
    if mqtt:
        connect = mqtt["connect_s"]
        targets.append(
            {
                "text": f"{TARGET_DEVICES:,} MQTT devices with subscriptions connected within "
                f"{TARGET_MQTT_CONNECT_S:g} s",
                "measured": f"{mqtt['held_by_hub']} held, connected in "
                + (f"{connect:.1f} s" if connect is not None else "(not all)"),
                "met": bool(
                    mqtt["devices"] >= TARGET_DEVICES
                    and mqtt["held_by_hub"] == mqtt["devices"]
                    and connect is not None
                    and connect <= TARGET_MQTT_CONNECT_S
                ),
            }
        )
    return {
        "benchmark": "connections",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "tcp": cfg.tcp,
            "mqtt": cfg.mqtt,
            "hold_s": cfg.hold_s,
            "connect_rate": cfg.connect_rate,
            "loop": cfg.loop,
            "lean": cfg.lean,
            "publish_probe_s": cfg.publish_probe_s,
            "publish_probe_devices": cfg.publish_probe_devices,
            "restart": cfg.restart,
        },
        **results,
        "targets": targets,
    }
