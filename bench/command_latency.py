"""`python -m bench.command_latency`: round-trip time of commands, per transport.

Layer: benchmarks; may import anything.

Starts a fresh RabbitMQ vhost and SQLite database, `hub run` and one
`celery -A tasks worker` as child processes, and one simulated device per
transport (TCP and MQTT) that answers commands. Then it sends `--commands`
`ping` commands to each device, one after another, each with
`send_command(...).get()`, and reports the median and 99th percentile of the
time from `send_command` to the reply being readable from the result backend.
That path is: database row, RabbitMQ to the hub holding the device, the
device, its answer back through the hub's dispatcher to RabbitMQ, the worker
completing the result, and the caller's poll of the result backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.services import Vhost, free_port, log
from tasks.worker import celery_worker_command

ROOT = Path(__file__).resolve().parents[1]


def _env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    # Off, not on the default ports 8083/8084 that another hub may hold.
    env.update({"HUB_MQTT_WS_PORT": "0", "HUB_MQTT_WSS_PORT": "0"})
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    return env


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class _Devices:
    """The simulated devices, on their own event loop in a thread."""

    def __init__(self, tcp_port: int, mqtt_port: int, creds: dict[str, str]) -> None:
        from firmware_sim import fleet

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stop_event: asyncio.Event | None = None

        async def main() -> None:
            self.stop_event = asyncio.Event()
            # One long-lived device per transport: connected, answering commands.
            await asyncio.gather(
                *(
                    fleet.run_fleet(
                        fleet.FleetOptions(
                            transport=transport,
                            host="127.0.0.1",
                            port=port,
                            devices=[(device_id, creds[device_id])],
                            messages=0,
                            linger=True,
                        ),
                        stop=self.stop_event,
                    )
                    for transport, port, device_id in (
                        ("tcp", tcp_port, "lat-tcp"),
                        ("mqtt", mqtt_port, "lat-mqtt"),
                    )
                )
            )

        self.future = asyncio.run_coroutine_threadsafe(main(), self.loop)

    def close(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        try:
            self.future.result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def run(commands: int) -> dict[str, Any]:
    from hub.registry import Registry
    from hub.settings import load_settings
    from hub.storage import make_engine, migrate

    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp, Vhost("cmdlat") as vhost:
        data = Path(tmp)
        settings = {
            "HUB_DATA_DIR": str(data),
            "HUB_BROKER_URL": vhost.url,
            "HUB_DATABASE_URL": f"sqlite:///{data / 'hub.sqlite3'}",
            "HUB_HOST": "127.0.0.1",
        }
        migrate(settings["HUB_DATABASE_URL"])
        registry = Registry(make_engine(settings["HUB_DATABASE_URL"]))
        creds = {d: registry.add(d) for d in ("lat-tcp", "lat-mqtt")}
        tcp_port, mqtt_port, http_port = free_port(), free_port(), free_port()
        hub_log = (data / "hub.log").open("w")
        worker_log = (data / "worker.log").open("w")
        hub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hubapp.cli",
                "run",
                "--no-worker",
                "--tcp-port",
                str(tcp_port),
                "--mqtt-port",
                str(mqtt_port),
                "--http-port",
                str(http_port),
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
        devices = None
        try:
            deadline = time.monotonic() + 60
            while "Press Ctrl+C" not in (data / "hub.log").read_text():
                if hub.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"hub did not start:\n{(data / 'hub.log').read_text()}")
                time.sleep(0.2)
            devices = _Devices(tcp_port, mqtt_port, creds)
            for key, value in settings.items():
                os.environ[key] = value
            import tasks.application

            tasks.application.configure(load_settings())
            from tasks import send_command

            # Warm up: both devices connected and every process past its first message.
            for device_id in creds:
                send_command(device_id, "ping", ttl=60).get(timeout=60)
            figures: dict[str, Any] = {}
            for transport, device_id in (("tcp", "lat-tcp"), ("mqtt", "lat-mqtt")):
                samples = []
                for n in range(commands):
                    start = time.perf_counter()
                    send_command(device_id, "ping", ttl=30).get(timeout=30, interval=0.005)
                    samples.append((time.perf_counter() - start) * 1000)
                    if (n + 1) % 100 == 0:
                        log(f"{transport}: {n + 1}/{commands} commands")
                figures[transport] = {
                    "commands": commands,
                    "median_ms": round(statistics.median(samples), 2),
                    "p99_ms": round(_percentile(samples, 0.99), 2),
                    "max_ms": round(max(samples), 2),
                }
            return figures
        finally:
            if devices is not None:
                devices.close()
            for process in (hub, worker):
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            hub_log.close()
            worker_log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.command_latency",
        description="Round-trip latency of commands to a TCP and an MQTT device.",
    )
    parser.add_argument("--commands", type=int, default=1000, help="per transport (1000)")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = parser.parse_args(argv)
    figures = run(args.commands)
    if not args.json:
        print(f"{'transport':<10}{'commands':>10}{'median ms':>12}{'p99 ms':>10}{'max ms':>10}")
        for transport, f in figures.items():
            print(
                f"{transport:<10}{f['commands']:>10}{f['median_ms']:>12}{f['p99_ms']:>10}"
                f"{f['max_ms']:>10}"
            )
    print(json.dumps({"benchmark": "command_latency", **figures}))


if __name__ == "__main__":
    main()
