"""`python -m bench tls-connections`: what a TLS device connection costs the hub.

Layer: benchmarks; may import anything.

The same measurement twice, each on a fresh hub (bench.connections): N idle
native TCP devices (default 5,000) held by a listener in the clear, then N
held by a listener with `tls = true` (a test CA made by `hubapp.certificates`,
ECDSA P-256 certificates, TLS 1.3 as negotiated). For each:

Both fleets connect at `--connect-rate` (300 a second by default), the same
for both so that the figures compare. Then:

- memory per connection: (hub RSS with the fleet held - hub RSS idle) / N;
- while the fleet is held, `--probes` new connections made one after another
  by this process: `handshake_ms`, from the TCP connect to the end of the TLS
  handshake (the TCP connect alone in the clear), and `login_ms`, from the
  TCP connect to the hub's ACK of the device's HELLO. Median and p99.

The ratio TLS / clear is printed for both. Nothing is asserted: the figures
depend on the machine (docs/benchmarks.md).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.connections import ConnectionsConfig, Probe, measure_transport
from bench.ingest import machine_info
from bench.services import LOCALHOST, BenchError, Vhost, fd_limit, log, raise_fd_limit

_CONFIG = """\
tls_cert_file = "{cert}"
tls_key_file = "{key}"

[[tcp_listeners]]
port = 0
codec = "native"
tls = {tls}
"""


@dataclass
class TlsConnectionsConfig:
    """What one run does; recorded in its JSON output."""

    devices: int = 5000
    probes: int = 200
    hold_s: float = 5.0
    #: New connections per second: all at once, thousands of TLS handshakes
    #: share the hub's CPU so evenly that each misses `hello_timeout_s`.
    connect_rate: float | None = 300.0
    connect_timeout_s: float = 300.0
    loop: str = "asyncio"
    quiet: bool = False


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3)}


def hello_probe(count: int, context: ssl.SSLContext | None) -> Probe:
    """`count` connections one after another: connect, (handshake,) HELLO, its ACK, close."""
    from hub.protocol.base import NEED_DATA
    from hub.protocol.discovery import load_codec
    from hub.protocol.events import Ack, Hello, Role

    factory = load_codec("native")

    def probe(port: int, device_id: str, credential: str) -> dict[str, Any]:
        handshake, login, failed = [], [], 0
        for boot in range(1, count + 1):
            codec = factory(Role.DEVICE)
            started = time.perf_counter()
            try:
                raw = socket.create_connection((LOCALHOST, port), timeout=10)
                sock: socket.socket = (
                    raw if context is None else context.wrap_socket(raw, server_hostname=LOCALHOST)
                )
                with sock:
                    shaken = time.perf_counter()
                    sock.sendall(
                        codec.send(Hello(device_id=device_id, credential=credential, boot_id=boot))
                    )
                    event: Any = NEED_DATA
                    while event is NEED_DATA:
                        data = sock.recv(65536)
                        codec.receive_data(data)
                        event = codec.next_event()
                        if not data and event is NEED_DATA:
                            break
                    if not isinstance(event, Ack):
                        failed += 1
                        continue
                    done = time.perf_counter()
            except OSError:
                failed += 1
                continue
            handshake.append((shaken - started) * 1000)
            login.append((done - started) * 1000)
        if not login:
            return {"probes": count, "failed": failed}
        return {
            "probes": count,
            "failed": failed,
            "handshake_ms": _percentiles(handshake),
            "login_ms": _percentiles(login),
        }

    return probe


def run_tls_connections(cfg: TlsConnectionsConfig) -> dict[str, Any]:
    """Measure N devices in the clear, then N over TLS; the JSON-able result."""
    from hubapp import certificates

    soft = raise_fd_limit()
    needed = cfg.devices + 1024
    if fd_limit() < needed or soft < needed:
        raise BenchError(
            f"the open-file limit ({soft}, hard {fd_limit()}) is below the {needed} this "
            "needs; raise the hard limit (ulimit -Hn, or LimitNOFILE) and run again"
        )
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-tls-conn-"))
    results: dict[str, Any] = {}
    conn_cfg = ConnectionsConfig(
        tcp=cfg.devices,
        mqtt=0,
        hold_s=cfg.hold_s,
        connect_rate=cfg.connect_rate,
        connect_timeout_s=cfg.connect_timeout_s,
        loop=cfg.loop,
        quiet=cfg.quiet,
    )
    try:
        ca = workdir / "ca"
        certificates.init_ca(ca)
        ca_cert = ca / certificates.CA_CERT
        client_context = ssl.create_default_context(cafile=ca_cert)
        for name in ("clear", "tls"):
            tls = name == "tls"
            config = workdir / f"{name}.toml"
            config.write_text(
                _CONFIG.format(
                    cert=ca / certificates.HUB_CERT,
                    key=ca / certificates.HUB_KEY,
                    tls="true" if tls else "false",
                ),
                "utf-8",
            )
            if not cfg.quiet:
                log(f"{name}: {cfg.devices} devices, then {cfg.probes} probe connections")
            with Vhost(f"tls-conn-{name}") as vhost:
                results[name] = measure_transport(
                    "tcp",
                    cfg.devices,
                    conn_cfg,
                    workdir / name,
                    vhost.url,
                    hub_env={"HUB_CONFIG": str(config)},
                    fleet_args=("--tls", "--cafile", str(ca_cert)) if tls else (),
                    probe=hello_probe(cfg.probes, client_context if tls else None),
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    clear, tls_result = results["clear"], results["tls"]

    def p50(result: dict[str, Any], key: str) -> float | None:
        figures = result.get("probe", {}).get(key)
        return None if figures is None else float(figures["p50"])

    return {
        "benchmark": "tls-connections",
        "transport": "tcp",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {k: v for k, v in asdict(cfg).items() if k != "quiet"},
        "clear": clear,
        "tls": tls_result,
        "ratio": {
            "rss_kb_per_connection": _ratio(
                tls_result["rss_kb_per_connection"], clear["rss_kb_per_connection"]
            ),
            "login_ms_p50": _ratio(p50(tls_result, "login_ms"), p50(clear, "login_ms")),
        },
    }


def tls_connections_table(result: dict[str, Any]) -> str:
    """The readable table of a `run_tls_connections` result."""
    clear, tls, ratio = result["clear"], result["tls"], result["ratio"]

    def probe(r: dict[str, Any], key: str, which: str) -> Any:
        return (r.get("probe", {}).get(key) or {}).get(which, "-")

    def row(label: str, a: Any, b: Any, r: Any = "") -> str:
        return f"{label:<30}{a!s:>12}{b!s:>12}{r!s:>10}"

    lines = [
        f"TCP device connections over TLS against the clear listener "
        f"({result['config']['devices']} devices, {result['config']['probes']} probes)",
        row("", "clear", "TLS", "TLS/clear"),
        row("held by the hub", clear["held_by_hub"], tls["held_by_hub"]),
        row("fleet connected in s", clear["connect_s"], tls["connect_s"]),
        row(
            "hub RSS KB per connection",
            clear["rss_kb_per_connection"],
            tls["rss_kb_per_connection"],
            ratio["rss_kb_per_connection"],
        ),
        row("hub RSS idle / held MB",
            f"{clear['hub_rss_mb']['idle']}/{clear['hub_rss_mb']['connected']}",
            f"{tls['hub_rss_mb']['idle']}/{tls['hub_rss_mb']['connected']}"),
        row("handshake ms p50", probe(clear, "handshake_ms", "p50"),
            probe(tls, "handshake_ms", "p50")),
        row("handshake ms p99", probe(clear, "handshake_ms", "p99"),
            probe(tls, "handshake_ms", "p99")),
        row("connect to HELLO ack ms p50", probe(clear, "login_ms", "p50"),
            probe(tls, "login_ms", "p50"), ratio["login_ms_p50"]),
        row("connect to HELLO ack ms p99", probe(clear, "login_ms", "p99"),
            probe(tls, "login_ms", "p99")),
        row("probes failed", clear.get("probe", {}).get("failed", "-"),
            tls.get("probe", {}).get("failed", "-")),
        row("fleet errors / refused", f"{clear['errors']}/{clear['refused']}",
            f"{tls['errors']}/{tls['refused']}"),
    ]  # fmt: skip
    return "\n".join(lines)
