"""Running fleets of simulated devices: `run_fleet(options)` and its table of transports.

Layer: firmware simulator; imports the simulator's device, options, pacing
and summary modules (and through them the hub core), never bridges or tasks.
Nothing in the simulator imports this module back.

A fleet is many devices (`firmware_sim.device.SimulatedDevice`: TCP, MQTT or
lean MQTT) run concurrently on one event loop. `run_fleet` builds them from one
`FleetOptions`, choosing the device class from `TRANSPORTS` by
`options.transport`, and runs them with `run_devices`, which also runs an
already built (possibly mixed) fleet. The devices share a `FleetStats` of
counters, which becomes progress reports on the way and a `FleetSummary` at
the end (`firmware_sim.summary`).

For convenience this module re-exports the names a caller of `run_fleet`
needs: `FleetOptions`, `FleetStats`, `FleetSummary`, `Progress` and the
`format_*` functions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from firmware_sim.device import AckHook, SimulatedDevice
from firmware_sim.lean_mqtt import LeanMqttDevice
from firmware_sim.mqtt_device import MqttDevice
from firmware_sim.options import FleetOptions
from firmware_sim.pacing import ConnectLimiter
from firmware_sim.summary import (
    FleetStats,
    FleetSummary,
    Progress,
    ProgressCallback,
    format_progress,
    format_summary,
    report_progress,
)
from firmware_sim.tcp_device import TcpDevice

__all__ = [
    "TRANSPORTS",
    "FleetOptions",
    "FleetStats",
    "FleetSummary",
    "Progress",
    "device_ids",
    "format_progress",
    "format_summary",
    "run_devices",
    "run_fleet",
]

log = logging.getLogger("firmware_sim")

#: The device class of each transport; `FleetOptions.transport` is a key.
TRANSPORTS: Mapping[str, type[SimulatedDevice[Any]]] = {
    "tcp": TcpDevice,
    "mqtt": MqttDevice,
    # Publish-only raw-socket MQTT for load runs (firmware_sim.lean_mqtt).
    "mqtt-lean": LeanMqttDevice,
}


def device_ids(prefix: str, count: int) -> list[str]:
    """`<prefix>1` ... `<prefix><count>`: devices are numbered from 1."""
    return [f"{prefix}{n}" for n in range(1, count + 1)]


async def run_fleet(
    options: FleetOptions,
    *,
    stop: asyncio.Event | None = None,
    stats: FleetStats | None = None,
    on_acknowledged: AckHook | None = None,
) -> FleetSummary:
    """Run the devices of `options` to the end; their summary.

    Set `stop` to end the run early (outstanding ACKs are still awaited, up to
    `options.drain_timeout_s`). Pass your own `stats` to watch the counters
    live, e.g. to wait until `stats.online == len(options.devices)`. At MQTT
    `qos=0` there is no acknowledgement and a message counts as acknowledged
    once written to the socket.
    """
    try:
        device_class = TRANSPORTS[options.transport]
    except KeyError:
        raise ValueError(
            f"unknown transport {options.transport!r}; one of: {', '.join(TRANSPORTS)}"
        ) from None
    if options.messages is None and options.duration_s is None and stop is None:
        raise ValueError("give messages, duration_s or a stop event, or the fleet never ends")
    stats = stats if stats is not None else FleetStats()
    limiter = ConnectLimiter(options.connect_rate) if options.connect_rate else None
    fleet = [
        device_class(
            device_id,
            credential,
            options,
            stats=stats,
            stop=stop,
            connect_limiter=limiter,
            on_acknowledged=on_acknowledged,
        )
        for device_id, credential in options.devices
    ]
    return await run_devices(
        fleet,
        transport=options.transport,
        stats=stats,
        progress=options.progress,
        progress_interval_s=options.progress_interval_s,
        qos=device_class.summary_qos(options),
    )


async def run_devices(
    devices: Sequence[SimulatedDevice[Any]],
    *,
    transport: str,
    stats: FleetStats,
    progress: ProgressCallback | None = None,
    progress_interval_s: float = 2.0,
    qos: int | None = None,
) -> FleetSummary:
    """Run already built devices that share `stats` to the end; the summary.

    `transport` only names the fleet in the summary ("mixed" for a fleet of
    both kinds).
    """
    loop = asyncio.get_running_loop()
    stats.devices = len(devices)
    started = loop.time()
    reporter = (
        asyncio.create_task(report_progress(stats, started, progress, progress_interval_s))
        if progress is not None
        else None
    )
    try:
        results = await asyncio.gather(*(d.run() for d in devices), return_exceptions=True)
    finally:
        if reporter is not None:
            reporter.cancel()
    for device, result in zip(devices, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            # A bug in the simulator must not hide the other devices' results.
            stats.errors += 1
            log.error("%s: crashed", device.device_id, exc_info=result)
    return FleetSummary.from_stats(transport, stats, loop.time() - started, qos=qos)
