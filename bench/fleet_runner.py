"""The simulated fleet as its own process, so that its CPU is accounted apart from the hub's.

Layer: benchmarks; may import anything.

`python -m bench.fleet_runner --transport tcp --port P --credentials creds.json
--duration 20` runs `firmware_sim`'s TCP or MQTT fleet (uvloop when installed;
`--lean`: MQTT's raw-socket publishers, `--subscribe` subscribing them to
their command topic) and writes JSON lines on stdout:

- `{"type": "progress", ...}` every `--progress-interval` seconds,
- `{"type": "online", "elapsed_s": ...}` once every device is connected (and,
  for MQTT, subscribed to its command topic),
- `{"type": "result", "summary": {...}, "started_at": ..., "cpu_s": ...}` at the end.

SIGTERM or SIGINT stops the fleet gracefully (outstanding acknowledgements are
still awaited). With `--linger` devices stay connected, idle, until stopped or
until `--duration` ends: that is how the connections benchmark holds a fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from firmware_sim.faults import FAULT_HELP, parse_fault
from firmware_sim.fleet import FleetOptions, FleetStats, run_fleet


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _watch(
    stats: FleetStats, devices: int, started: float, interval_s: float, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    online_reported = False
    next_progress = loop.time() + interval_s
    last_acked, last_at = 0, loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.05)
        now = loop.time()
        if not online_reported and stats.online >= devices:
            online_reported = True
            _emit({"type": "online", "t": time.time(), "elapsed_s": round(now - started, 3)})
        if now >= next_progress:
            next_progress = now + interval_s
            rate = (stats.acknowledged - last_acked) / (now - last_at)
            last_acked, last_at = stats.acknowledged, now
            _emit(
                {
                    "type": "progress",
                    "t": time.time(),
                    "elapsed_s": round(now - started, 1),
                    "connected": stats.connected,
                    "online": stats.online,
                    "sent": stats.sent,
                    "acknowledged": stats.acknowledged,
                    "errors": stats.errors,
                    "refused": stats.refused,
                    "rate_per_s": round(rate, 1),
                }
            )


async def _run(args: argparse.Namespace, credentials: dict[str, str]) -> dict[str, Any]:
    devices = list(credentials.items())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats = FleetStats()
    mqtt = args.transport == "mqtt"
    options = FleetOptions(
        transport="mqtt-lean" if mqtt and args.lean else args.transport,
        host=args.host,
        port=args.port,
        devices=devices,
        messages=args.messages,
        duration_s=args.duration,
        rate=args.rate,
        window=args.window,
        connect_rate=args.connect_rate,
        linger=args.linger,
        drain_timeout_s=args.drain_timeout,
        give_up_s=args.give_up,
        fault=parse_fault(args.fault) if args.fault else None,
        tls=args.tls,
        tls_ca_file=Path(args.cafile) if args.cafile else None,
        subscribe=mqtt and args.lean and args.subscribe,
        **({"qos": args.qos, "topic_root": args.topic_root} if mqtt else {}),
    )
    started_wall = time.time()
    started = loop.time()
    cpu_before = _cpu_s()
    watcher_stop = asyncio.Event()
    watcher = asyncio.create_task(
        _watch(stats, len(devices), started, args.progress_interval, watcher_stop)
    )
    try:
        summary = await run_fleet(options, stop=stop, stats=stats)
    finally:
        watcher_stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return {
        "type": "result",
        "summary": {**summary.to_dict(), "refused_reasons": summary.refused_reasons},
        "started_at": started_wall,
        "ended_at": time.time(),
        "cpu_s": round(_cpu_s() - cpu_before, 3),
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet_runner",
        description="Run a simulated fleet and report JSON lines (used by `python -m bench`).",
    )
    parser.add_argument("--transport", choices=["tcp", "mqtt"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--credentials", required=True, help="JSON file: device id -> credential")
    parser.add_argument("--messages", type=int, help="messages per device")
    parser.add_argument("--duration", type=float, help="seconds to send (or to linger)")
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s per device; 0 = max")
    parser.add_argument("--window", type=int, default=64, help="unacknowledged per device")
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1])
    parser.add_argument("--topic-root", default="devices")
    parser.add_argument(
        "--lean", action="store_true", help="MQTT: raw-socket publishers (firmware_sim.lean_mqtt)"
    )
    parser.add_argument(
        "--subscribe",
        action="store_true",
        help="with --lean: subscribe to the command topic before counting as online",
    )
    parser.add_argument("--connect-rate", type=float, help="new connections per second")
    parser.add_argument("--linger", action="store_true", help="stay connected until stopped")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--give-up", type=float, default=60.0)
    parser.add_argument("--progress-interval", type=float, default=2.0)
    parser.add_argument("--fault", metavar="NAME[:ARG]", help=f"inject a fault: {FAULT_HELP}")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument(
        "--tls", action="store_true", help="devices connect over TLS (TCP, or MQTT on the TLS port)"
    )
    parser.add_argument("--cafile", help="with --tls: the CA that signs the hub's certificate")
    args = parser.parse_args(argv)
    if args.messages is None and args.duration is None:
        parser.error("give --messages or --duration")

    loop_factory = None
    if args.loop != "asyncio":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            if args.loop == "uvloop":
                parser.error("uvloop is not installed")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        credentials = json.loads(Path(args.credentials).read_text("utf-8"))
        _emit(runner.run(_run(args, credentials)))


if __name__ == "__main__":
    main()
