"""`python -m bench.console`: how fast the console answers, and what it costs the hub.

Layer: benchmarks; may import anything.

Two parts, each starting what it needs and removing it afterwards:

- `lists`: a PostgreSQL database of its own on 127.0.0.1:5432 (user postgres,
  dropped at the end) with 10,000 devices (half held by a live hub) and
  5,000,000 telemetry rows over 2,500 devices; a `hub console` on it. It
  measures, one request after another, `GET /api/devices` (a page of 100, from the middle),
  the devices page (HTML, 50 rows) and one device's 1,000 newest telemetry
  rows (`GET /api/devices/{id}/telemetry?limit=1000`, and the query alone),
  with their median and 99th percentile.
- `sse`: RabbitMQ (a vhost of its own), `hub run`, one worker, a console and
  a simulated TCP fleet sending as fast as acknowledgements allow. The fleet
  runs three times in one run: with no console client, with 50 clients on
  `/api/events`, and with none again; it reports the fleet's acknowledged
  messages per second each time and the events the clients received.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.services import Vhost, free_port, log
from tasks.worker import celery_worker_command

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def _env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    return env


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _figures(samples_ms: list[float]) -> dict[str, float]:
    return {
        "requests": len(samples_ms),
        "p50_ms": round(statistics.median(samples_ms), 2),
        "p99_ms": round(_percentile(samples_ms, 0.99), 2),
    }


def _time(call: Callable[[], Any], n: int, warm: int = 10) -> list[float]:
    for _ in range(warm):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


class _Console:
    def __init__(self, settings: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = _env(
            {
                **settings,
                "HUB_HOST": "127.0.0.1",
                "HUB_CONSOLE_PORT": str(self.port),
                "HUB_LOG_LEVEL": "WARNING",
            }
        )
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hubapp.cli", "console"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the console did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        _stop(self.process)
        self._log.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- lists: 10,000 devices and 5 million rows on PostgreSQL -----------------------------


def _fill(url: str, devices: int, rows: int, with_rows: int) -> None:
    from sqlalchemy import text

    from hub.storage import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO devices (id, credential_sha256, created_at) "
                    "SELECT 'bench-' || g, md5(g::text), now() FROM generate_series(1, :n) g"
                ),
                {"n": devices},
            )
            conn.execute(
                text(
                    "INSERT INTO device_state (device_id, state, last_values, online, transport, "
                    "last_seen_at, updated_at) SELECT 'bench-' || g, '{}', "
                    "json_build_object('temperature', 20.5), true, 'tcp', now(), now() "
                    "FROM generate_series(1, :n) g"
                ),
                {"n": devices},
            )
            conn.execute(
                text(
                    "INSERT INTO hubs VALUES ('bench-hub', '0', 'bench', 'localhost', 1, '[]', "
                    ":half, 0, 0, 1, 3600, now(), now())"
                ),
                {"half": devices // 2},
            )
            conn.execute(
                text(
                    "INSERT INTO device_connections (device_id, hub_id, transport, connected_at) "
                    "SELECT 'bench-' || g, 'bench-hub', 'tcp', now() "
                    "FROM generate_series(1, :n, 2) g"
                ),
                {"n": devices},
            )
        log(f"inserting {rows:,} telemetry rows over {with_rows:,} devices...")
        with engine.begin() as conn:
            # Without the index while filling, then built once: minutes, not tens of them.
            conn.execute(text("DROP INDEX ix_telemetry_device_received"))
            conn.execute(
                text(
                    "INSERT INTO telemetry (envelope_id, device_id, seq, device_time, received_at, "
                    "stored_at, transport, protocol, payload) "
                    "SELECT md5(g::text), 'bench-' || (1 + g % :k), g, NULL, "
                    "now() - make_interval(secs => g / 100.0), now(), 'tcp', 'native', "
                    "json_build_object('temperature', 20 + (g % 100) / 10.0, 'battery', 99) "
                    "FROM generate_series(1, :n) g"
                ),
                {"n": rows, "k": with_rows},
            )
            conn.execute(
                text(
                    "CREATE INDEX ix_telemetry_device_received "
                    "ON telemetry (device_id, received_at)"
                )
            )
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()


def run_lists(devices: int = 10_000, rows: int = 5_000_000, requests: int = 200) -> dict[str, Any]:
    import psycopg

    from hub import accounts, fleet
    from hub.storage import make_engine, migrate

    name = f"hub_bench_console_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG}/{name}"
    console: _Console | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp:
            migrate(url)
            started = time.monotonic()
            _fill(url, devices, rows, with_rows=max(1, min(2_500, rows // 2_000)))
            log(f"database filled in {time.monotonic() - started:.0f} s")
            engine = make_engine(url)
            token = accounts.add_token(engine, "bench", "viewer")
            password = accounts.add_user(engine, "bench", "viewer")
            settings = {"HUB_DATA_DIR": tmp, "HUB_DATABASE_URL": url}
            console = _Console(settings, Path(tmp) / "console.log")
            figures: dict[str, Any] = {"devices": devices, "telemetry_rows": rows}
            with httpx.Client(
                base_url=console.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
            ) as api:
                page = api.get("/api/devices", params={"limit": 100, "offset": devices // 2}).json()
                assert page["total"] == devices and len(page["items"]) == 100
                figures["api_devices_page_of_100"] = _figures(
                    _time(
                        lambda: api.get(
                            "/api/devices", params={"limit": 100, "offset": devices // 2}
                        ),
                        requests,
                    )
                )
                figures["api_devices_online_filter"] = _figures(
                    _time(
                        lambda: api.get("/api/devices", params={"limit": 100, "online": "true"}),
                        requests,
                    )
                )
                one = "bench-1"
                got = api.get(f"/api/devices/{one}/telemetry", params={"limit": 1000}).json()
                assert len(got["items"]) == 1000
                figures["api_telemetry_1000_rows"] = _figures(
                    _time(
                        lambda: api.get(f"/api/devices/{one}/telemetry", params={"limit": 1000}),
                        requests,
                    )
                )
                figures["query_telemetry_1000_rows"] = _figures(
                    _time(lambda: fleet.telemetry(engine, one, limit=1000), requests)
                )
            with httpx.Client(base_url=console.url, timeout=30) as browser:
                form = browser.get("/login").text
                csrf = form.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
                browser.post(
                    "/login", data={"username": "bench", "password": password, "csrf_token": csrf}
                )
                assert browser.get("/devices").status_code == 200
                figures["devices_page_html_50"] = _figures(
                    _time(lambda: browser.get("/devices"), requests)
                )
            engine.dispose()
            return figures
    finally:
        if console is not None:
            console.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# -- sse: 50 live clients while the hub ingests -----------------------------------------


class _SseClients:
    def __init__(self, url: str, token: str, n: int) -> None:
        self.events = [0] * n
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, token, i), daemon=True) for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def _run(self, url: str, token: str, index: int) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.stream("GET", f"{url}/api/events", headers=headers, timeout=None) as s:
                for line in s.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("event: "):
                        self.events[index] += 1
        except httpx.HTTPError:
            return

    def stop(self) -> None:
        self._stop.set()


def _fleet(settings: dict[str, str], port: int, devices: int, duration: float) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from firmware_sim.cli import main; main()",
            "tcp",
            "--port",
            str(port),
            "--devices",
            str(devices),
            "--duration",
            str(duration),
            "--provision",
            "--json",
            "--quiet",
            "--prefix",
            f"sse-{uuid.uuid4().hex[:4]}-",
        ],
        cwd=ROOT,
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=duration + 180,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise SystemExit(f"the fleet failed ({result.returncode}): {result.stderr[-2000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def run_sse(clients: int = 50, devices: int = 20, duration: float = 20.0) -> dict[str, Any]:
    from hub import accounts
    from hub.storage import make_engine, migrate

    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp, Vhost("console") as vhost:
        data = Path(tmp)
        db = f"sqlite:///{data / 'hub.sqlite3'}"
        settings = {
            "HUB_DATA_DIR": tmp,
            "HUB_BROKER_URL": vhost.url,
            "HUB_DATABASE_URL": db,
            "HUB_HOST": "127.0.0.1",
            "HUB_HUB_HEARTBEAT_S": "1",
            # The whole fleet connects from one loopback address.
            "HUB_MAX_CONNECTS_PER_ADDRESS_PER_S": "0",
            "HUB_MAX_CONNECTIONS_PER_ADDRESS": "0",
        }
        migrate(db)
        engine = make_engine(db)
        token = accounts.add_token(engine, "bench", "viewer")
        engine.dispose()
        tcp_port = free_port()
        hub_log = (data / "hub.log").open("wb")
        worker_log = (data / "worker.log").open("wb")
        hub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hubapp.cli",
                "run",
                "--no-worker",
                "--no-mqtt",
                "--tcp-port",
                str(tcp_port),
                "--http-port",
                str(free_port()),
            ],
            cwd=ROOT,
            env=_env(settings),
            stdout=hub_log,
            stderr=subprocess.STDOUT,
        )
        worker = subprocess.Popen(
            celery_worker_command(concurrency=1),
            cwd=ROOT,
            env=_env(settings),
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
        console: _Console | None = None
        sse: _SseClients | None = None
        try:
            deadline = time.monotonic() + 60
            while b"Press Ctrl+C" not in (data / "hub.log").read_bytes():
                if hub.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"hub did not start:\n{(data / 'hub.log').read_text()}")
                time.sleep(0.2)
            console = _Console(settings, data / "console.log")
            log("fleet without console clients...")
            alone = _fleet(settings, tcp_port, devices, duration)
            sse = _SseClients(console.url, token, clients)
            time.sleep(2)
            log(f"fleet with {clients} clients on /api/events...")
            watched = _fleet(settings, tcp_port, devices, duration)
            time.sleep(2)
            sse.stop()
            received = list(sse.events)
            time.sleep(2)
            # Once more without clients: a change between the first two runs that
            # is not the clients' doing (a worker backlog, a bigger database) shows here.
            log("fleet without console clients again...")
            after = _fleet(settings, tcp_port, devices, duration)
            return {
                "devices": devices,
                "duration_s": duration,
                "rate_without_clients_per_s": round(alone["rate_per_s"], 1),
                "rate_with_clients_per_s": round(watched["rate_per_s"], 1),
                "rate_without_clients_after_per_s": round(after["rate_per_s"], 1),
                "clients": clients,
                "events_per_client_min": min(received),
                "events_per_client_max": max(received),
            }
        finally:
            if sse is not None:
                sse.stop()
            if console is not None:
                console.stop()
            for process in (hub, worker):
                _stop(process)
            hub_log.close()
            worker_log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.console",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("part", choices=["lists", "sse", "all"], nargs="?", default="all")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    if args.part in ("lists", "all"):
        out["lists"] = run_lists(args.devices, args.rows, args.requests)
        log(json.dumps(out["lists"]))
    if args.part in ("sse", "all"):
        out["sse"] = run_sse(args.clients, duration=args.duration)
        log(json.dumps(out["sse"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
