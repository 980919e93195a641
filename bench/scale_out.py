"""`python -m bench scale-out`: ingest through one hub against two hubs behind HAProxy.

Layer: benchmarks; may import anything.

Per transport, two configurations one after the other, each with a fresh
RabbitMQ vhost, a fresh PostgreSQL database and one worker of the same
options (bench.ingest.start_worker):

- "one hub": one `hub run --no-worker` (bench.ingest.start_hub), the fleet
  connected to it directly;
- "two hubs": two `hub run --no-worker` with distinct `hub_id`s and ports on
  the same vhost and database, HAProxy in front as docs/haproxy.cfg configures
  it (bench.haproxy), the fleet connected to HAProxy.

The same simulated fleet (bench.fleet_runner: devices, duration, window)
runs against each, and bench.ingest.measure records what it records for
ingest: messages acknowledged and stored per second (the stored rate over the
span from the fleet's start to the last row), and CPU per stored message of
the hubs (summed) and of the worker. HAProxy's CPU is reported apart. Every
acknowledged message must be stored exactly once: rows = distinct envelope
ids, and at least every acknowledged message.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.haproxy import Haproxy, start_haproxy
from bench.ingest import (
    IngestConfig,
    Roles,
    _hub_metrics,
    fleet_argv,
    machine_info,
    make_credentials,
    measure,
    provision_hub,
    start_hub,
    start_worker,
)
from bench.postgres import postgres_database
from bench.services import LOCALHOST, Child, QueueProbe, Vhost, log, raise_fd_limit

CONFIGURATIONS = (("one-hub", 1), ("two-hubs", 2))


@dataclass
class ScaleOutConfig:
    transports: list[str] = field(default_factory=lambda: ["tcp"])
    devices: int = 50
    duration_s: float = 15.0
    window: int = 64
    #: Pool processes of the one worker of each configuration (prefork).
    worker_concurrency: int = 2
    drain_timeout_s: float = 300.0
    quiet: bool = False


def _ingest_config(cfg: ScaleOutConfig, transport: str) -> IngestConfig:
    return IngestConfig(
        transport=transport,
        devices=cfg.devices,
        duration_s=cfg.duration_s,
        window=cfg.window,
        worker_concurrency=cfg.worker_concurrency,
        worker_pool="prefork",
        drain_timeout_s=cfg.drain_timeout_s,
        baseline=False,
        systems=["hub"],
        quiet=cfg.quiet,
    )


def _stored_once(database_url: str) -> tuple[int, int]:
    """(rows, distinct envelope ids) of the telemetry table."""
    from sqlalchemy import text

    from hub.storage import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows, distinct = conn.execute(
                text("SELECT count(*), count(DISTINCT envelope_id) FROM telemetry")
            ).one()
    finally:
        engine.dispose()
    return int(rows), int(distinct)


def run_configuration(
    cfg: ScaleOutConfig, transport: str, label: str, hub_count: int, folder: Path
) -> dict[str, Any]:
    """One configuration: vhost, database, worker, `hub_count` hubs (HAProxy in front
    of two), the fleet; its measured figures."""
    from hub.envelope import Kind
    from hub.routing import QUEUES
    from hub.storage import make_engine

    icfg = _ingest_config(cfg, transport)
    folder.mkdir(parents=True)
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    credentials = make_credentials(prefix, cfg.devices)
    credentials_file = folder / "credentials.json"
    credentials_file.write_text(json.dumps(credentials), "utf-8")
    queue = QUEUES[Kind.TELEMETRY]
    with contextlib.ExitStack() as stack:
        if not cfg.quiet:
            log(f"{transport} {label}: preparing a vhost, a database and a worker")
        vhost = stack.enter_context(Vhost(f"scale-{label}"))
        database_url = stack.enter_context(postgres_database(f"scale_{label.replace('-', '_')}"))
        provision_hub(database_url, credentials)
        probe = QueueProbe(vhost.url)
        stack.callback(probe.close)
        worker_env = {
            "HUB_BROKER_URL": vhost.url,
            "HUB_DATABASE_URL": database_url,
            "HUB_DATA_DIR": str(folder / "worker-data"),
        }
        worker = start_worker(label, "tasks", queue, worker_env, icfg, folder, probe)
        stack.callback(worker.stop)
        hubs: list[Child] = []
        hub_ports: list[dict[str, int]] = []
        for n in range(1, hub_count + 1):
            hub_folder = folder / f"hub{n}"
            hub_folder.mkdir()
            hub, ports = start_hub(
                icfg, hub_folder, vhost.url, database_url, mqtt=transport == "mqtt",
                env={"HUB_HUB_ID": f"{label}-{n}"},
            )  # fmt: skip
            stack.callback(hub.stop)
            hubs.append(hub)
            hub_ports.append(ports)
        proxy: Haproxy | None = None
        if hub_count == 1:
            device_port = hub_ports[0][transport]
        else:
            proxy = start_haproxy(folder, hub_ports)
            stack.callback(proxy.child.stop)
            device_port = proxy.tcp_port if transport == "tcp" else proxy.mqtt_port
        if not cfg.quiet:
            via = "HAProxy" if proxy else "the hub"
            log(f"{transport} {label}: {cfg.devices} devices to {via} on {LOCALHOST}:{device_port}")
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        proxy_cpu0 = proxy.child.cpu_s() if proxy else 0.0
        measured = measure(
            f"{transport} {label}", icfg, Roles(server=hubs, worker=worker),
            fleet_argv(icfg, device_port, credentials_file, "devices"), folder,
            (engine, "telemetry", ""), (probe, queue),
        )  # fmt: skip
        proxy_cpu = proxy.child.cpu_s() - proxy_cpu0 if proxy else None
        if proxy:
            proxy.child.check_alive()
        per_hub = [
            _hub_metrics(ports.get("http")).get("envelopes_published") for ports in hub_ports
        ]
        rows, distinct = _stored_once(database_url)
    stored = max(measured["stored"], 1)
    return {
        "configuration": label,
        "hubs": hub_count,
        "transport": transport,
        # Both removed at the end of the run.
        "vhost": vhost.name,
        "database": database_url.rsplit("/", 1)[1],
        "devices": measured["devices"],
        "connected": measured["connected"],
        "fleet_duration_s": measured["fleet_duration_s"],
        "sent": measured["sent"],
        "acknowledged": measured["acknowledged"],
        "acked_per_s": measured["acked_per_s"],
        "stored": measured["stored"],
        "stored_per_s": measured["stored_per_s"],
        "stored_span_s": measured["stored_span_s"],
        "rows": rows,
        "distinct_envelopes": distinct,
        "duplicate_rows": rows - distinct,
        "missing_rows": max(measured["acknowledged"] - distinct, 0),
        # Every acknowledged message stored, none twice (a message sent but not
        # acknowledged when the fleet stopped may be stored too).
        "stored_once": rows == distinct and distinct >= measured["acknowledged"],
        "errors": measured["errors"],
        "refused": measured["refused"],
        "hub_cpu_us_per_message": measured["cpu_us_per_message"]["server"],
        "worker_cpu_us_per_message": measured["cpu_us_per_message"]["worker"],
        "haproxy_cpu_us_per_message": (
            round(proxy_cpu / stored * 1e6, 1) if proxy_cpu is not None else None
        ),
        "cpu_s": measured["cpu_s"],
        "envelopes_published_by_hub": per_hub,
        "latency_ms": measured["latency_ms"],
    }


def _ratio(two: float | None, one: float | None) -> float | None:
    return round(two / one, 2) if two is not None and one else None


def run_scale_out(cfg: ScaleOutConfig) -> dict[str, Any]:
    """Both configurations for every transport; the JSON-able result."""
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    runs: list[dict[str, Any]] = []
    try:
        for transport in cfg.transports:
            for label, count in CONFIGURATIONS:
                if not cfg.quiet:
                    log(f"{transport}: {label} ({count} hub{'s' if count > 1 else ''})")
                runs.append(
                    run_configuration(cfg, transport, label, count, workdir / transport / label)
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {}
    for transport in cfg.transports:
        one, two = (next(r for r in runs if r["transport"] == transport and r["hubs"] == n)
                    for n in (1, 2))  # fmt: skip
        ratios[transport] = {
            key: _ratio(two[key], one[key])
            for key in (
                "stored_per_s",
                "acked_per_s",
                "hub_cpu_us_per_message",
                "worker_cpu_us_per_message",
            )
        }
    return {
        "benchmark": "scale-out",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {k: v for k, v in asdict(cfg).items() if k != "quiet"},
        "workdir": str(workdir),
        "runs": runs,
        "ratio_two_to_one": ratios,
    }


def scale_out_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"ingest through one hub against two hubs behind HAProxy: {cfg['devices']} devices, "
        f"{cfg['duration_s']:g} s, one worker each (prefork, {cfg['worker_concurrency']} "
        "processes), PostgreSQL",
        f"{'transport':<9} {'configuration':<13} {'stored msg/s':>12} {'over s':>7} "
        f"{'acked msg/s':>11} {'hub CPU us/msg':>14} {'worker us/msg':>13} "
        f"{'haproxy us/msg':>14} {'once':>5}  per hub",
    ]
    for r in result["runs"]:
        proxy = r["haproxy_cpu_us_per_message"]
        shares = ", ".join(
            "?" if v is None else f"{v:.0f}" for v in r["envelopes_published_by_hub"]
        )
        lines.append(
            f"{r['transport']:<9} {r['configuration']:<13} {r['stored_per_s']:>12,.0f} "
            f"{r['stored_span_s']:>7.1f} {r['acked_per_s']:>11,.0f} "
            f"{r['hub_cpu_us_per_message']:>14.0f} {r['worker_cpu_us_per_message']:>13.0f} "
            f"{'-' if proxy is None else f'{proxy:.0f}':>14} "
            f"{'yes' if r['stored_once'] else 'NO':>5}  {shares}"
        )
    for transport, ratio in result["ratio_two_to_one"].items():

        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines.append(
            f"{transport:<9} {'two/one':<13} {show(ratio['stored_per_s']):>12} {'':>7} "
            f"{show(ratio['acked_per_s']):>11} {show(ratio['hub_cpu_us_per_message']):>14} "
            f"{show(ratio['worker_cpu_us_per_message']):>13}"
        )
    bad = [r for r in result["runs"] if not r["stored_once"]]
    for r in bad:
        lines.append(
            f"{r['transport']} {r['configuration']}: {r['acknowledged']} acknowledged, "
            f"{r['rows']} rows, {r['distinct_envelopes']} distinct"
        )
    return "\n".join(lines)
