"""`python -m bench ingest --tls`: ingest over TLS against the clear listener, in one run.

Layer: benchmarks; may import anything.

One hub process (`hub run --no-worker`) serves, with a test CA made by
`hubapp.certificates`, either (`--transport tcp`) the native protocol on two
listeners, one in the clear and one with `tls = true`, or (`--transport
mqtt`) the embedded broker on `mqtt_port` and on `mqtt_tls_port`, at the
QoS of `--qos` (1 by default); one `celery -A tasks worker` stores for both. The same
fleet (bench.fleet_runner) runs against the clear port, then, with devices of
its own, against the TLS port: each is measured as in `bench.ingest` (acked
and stored per second, latency, CPU, memory), and the result has the ratio
TLS / clear. Nothing is compared with the baseline: the question is what TLS
costs the hub.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import (
    IngestConfig,
    Roles,
    _ratio,
    fleet_argv,
    machine_info,
    make_credentials,
    measure,
    provision_hub,
    start_hub,
    start_worker,
)
from bench.services import (
    LOCALHOST,
    BenchError,
    QueueProbe,
    Vhost,
    free_port,
    log,
    raise_fd_limit,
)

#: The hub's listeners measured, clear and TLS, by the name `hub run` prints.
_LISTENERS = {"tcp": ("tcp/native", "tcp/native+tls"), "mqtt": ("mqtt", "mqtt-tls")}

_CONFIG = """\
tls_cert_file = "{cert}"
tls_key_file = "{key}"
"""
_TCP_LISTENERS = """
[[tcp_listeners]]
port = 0
codec = "native"

[[tcp_listeners]]
port = 0
codec = "native"
tls = true
"""


def _listener_ports(log_text: str) -> dict[str, int]:
    """The hub's listeners by full name (`tcp/native`, `tcp/native+tls`, `http`)."""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\s+(\S+)\s+127\.0\.0\.1:(\d+)", log_text, re.MULTILINE)
    }


def run_tls_ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Measure the clear listener, then the TLS one, of one hub; the JSON-able result."""
    from hub.envelope import Kind
    from hub.routing import QUEUES
    from hub.storage import make_engine
    from hubapp import certificates

    if cfg.transport not in _LISTENERS:
        raise BenchError(f"--tls measures --transport tcp or mqtt, not {cfg.transport}")
    mqtt = cfg.transport == "mqtt"
    raise_fd_limit()
    folder = Path(tempfile.mkdtemp(prefix="hub-bench-tls-"))
    results: dict[str, Any] = {}
    try:
        ca = folder / "ca"
        certificates.init_ca(ca)
        config = folder / "hub.toml"
        config.write_text(
            _CONFIG.format(cert=ca / certificates.HUB_CERT, key=ca / certificates.HUB_KEY)
            + ("" if mqtt else _TCP_LISTENERS),
            "utf-8",
        )
        # 0 would turn MQTT over TLS off, so the port is picked here.
        hub_env = {"HUB_CONFIG": str(config), "HUB_MQTT_TLS_PORT": str(free_port())}
        runs = {name: f"{name[0]}{uuid.uuid4().hex[:6]}-" for name in ("clear", "tls")}
        credentials = {name: make_credentials(p, cfg.devices) for name, p in runs.items()}
        database_url = cfg.database_url or f"sqlite:///{folder / 'hub.sqlite3'}"
        queue = QUEUES[Kind.TELEMETRY]
        with contextlib.ExitStack() as stack:
            if not cfg.quiet:
                log("hub: preparing a vhost, the database and a worker")
            vhost = stack.enter_context(Vhost("hub-tls"))
            provision_hub(database_url, {**credentials["clear"], **credentials["tls"]})
            probe = QueueProbe(vhost.url)
            stack.callback(probe.close)
            worker_env = {
                "HUB_BROKER_URL": vhost.url,
                "HUB_DATABASE_URL": database_url,
                "HUB_DATA_DIR": str(folder / "worker-data"),
            }
            worker = start_worker("hub", "tasks", queue, worker_env, cfg, folder, probe)
            stack.callback(worker.stop)
            hub, _ = start_hub(cfg, folder, vhost.url, database_url, mqtt=mqtt, env=hub_env)
            stack.callback(hub.stop)
            ports = _listener_ports(hub.log_text())
            roles = Roles(server=[hub], worker=worker, http_port=ports.get("http"))
            engine = make_engine(database_url)
            stack.callback(engine.dispose)
            for name, listener in zip(("clear", "tls"), _LISTENERS[cfg.transport], strict=True):
                port = ports[listener]
                credentials_file = folder / f"{name}-credentials.json"
                credentials_file.write_text(json.dumps(credentials[name]), "utf-8")
                argv = fleet_argv(cfg, port, credentials_file, "devices")
                if name == "tls":
                    argv += ["--tls", "--cafile", str(ca / certificates.CA_CERT)]
                if not cfg.quiet:
                    log(f"hub {name}: {LOCALHOST}:{port}; starting {cfg.devices} devices")
                run_folder = folder / name
                run_folder.mkdir()
                results[name] = measure(
                    f"hub {name}", cfg, roles, argv, run_folder,
                    (engine, "telemetry", runs[name]), (probe, queue),
                )  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    clear, tls = results["clear"], results["tls"]
    return {
        "benchmark": "ingest-tls",
        "transport": cfg.transport,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("quiet", "systems")},
        "clear": clear,
        "tls": tls,
        "ratio": {
            "acked_per_s": _ratio(tls["acked_per_s"], clear["acked_per_s"]),
            "stored_per_s": _ratio(tls["stored_per_s"], clear["stored_per_s"]),
        },
    }


def tls_table(result: dict[str, Any]) -> str:
    """The readable table of a `run_tls_ingest` result."""
    clear, tls, ratio = result["clear"], result["tls"], result["ratio"]

    def row(label: str, a: Any, b: Any, r: Any = "") -> str:
        return f"{label:<28}{a!s:>14}{b!s:>14}{r!s:>10}"

    what = "TCP" if result["transport"] == "tcp" else f"MQTT QoS {result['config']['qos']}"
    lines = [
        f"{what} ingest over TLS against the clear listener ({clear['devices']} devices)",
        row("", "clear", "TLS", "TLS/clear"),
        row("acked per s", clear["acked_per_s"], tls["acked_per_s"], ratio["acked_per_s"]),
        row("stored per s", clear["stored_per_s"], tls["stored_per_s"], ratio["stored_per_s"]),
        row(
            "hub CPU us per message",
            clear["cpu_us_per_message"]["server"],
            tls["cpu_us_per_message"]["server"],
        ),
        row("latency p50 ms", _latency(clear, "p50"), _latency(tls, "p50")),
        row("latency p99 ms", _latency(clear, "p99"), _latency(tls, "p99")),
        row("server RSS peak MB", clear["server_rss_mb"]["peak"], tls["server_rss_mb"]["peak"]),
        row("all stored", clear["all_stored"], tls["all_stored"]),
        row("errors / refused", _faults(clear), _faults(tls)),
    ]
    return "\n".join(lines)


def _latency(result: dict[str, Any], which: str) -> Any:
    return (result.get("latency_ms") or {}).get(which, "-")


def _faults(result: dict[str, Any]) -> str:
    return f"{result['errors']}/{result['refused']}"
