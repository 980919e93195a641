"""A fleet's counters, its end-of-run summary and its progress reports.

Layer: firmware simulator; imports nothing of the project (standard library
only), so that every other simulator module may import it.

The devices of a fleet share one `FleetStats` (one event loop, so no locks).
`report_progress` turns it into a `Progress` every few seconds while the fleet
runs, and `FleetSummary.from_stats` into the outcome at the end; the
`format_*` functions are the text the `firmware-sim` command prints.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SUMMARY_KEYS",
    "FleetStats",
    "FleetSummary",
    "Progress",
    "ProgressCallback",
    "format_progress",
    "format_summary",
    "report_progress",
]

#: Keys of `FleetSummary.to_json()`, in order; scripts depend on them.
SUMMARY_KEYS = (
    "transport",
    "devices",
    "connected",
    "sent",
    "acknowledged",
    "refused",
    "errors",
    "duration_s",
    "rate_per_s",
    "commands_answered",
)


@dataclass
class FleetStats:
    """Live counters shared by the devices of a fleet (one event loop, so no locks).

    `sent` counts distinct messages, not retransmissions; `acknowledged`
    counts each message once however many ACKs it gets. `connected` counts
    devices that were accepted at least once, `online` those connected now.
    """

    devices: int = 0
    connected: int = 0
    online: int = 0
    sent: int = 0
    acknowledged: int = 0
    refused: int = 0
    errors: int = 0
    commands_answered: int = 0
    finished: int = 0
    refused_reasons: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class FleetSummary:
    """The outcome of a fleet run.

    `rate_per_s` is acknowledged messages per second of the whole run
    (connecting and draining included). For MQTT at QoS 0 there is no
    acknowledgement: a message counts as acknowledged once written to the
    socket (`qos` records which applied).
    """

    transport: str
    devices: int
    connected: int
    sent: int
    acknowledged: int
    refused: int
    errors: int
    duration_s: float
    rate_per_s: float
    commands_answered: int
    refused_reasons: dict[str, int] = field(default_factory=dict)
    qos: int | None = None

    @classmethod
    def from_stats(
        cls, transport: str, stats: FleetStats, duration_s: float, *, qos: int | None = None
    ) -> FleetSummary:
        return cls(
            transport=transport,
            devices=stats.devices,
            connected=stats.connected,
            sent=stats.sent,
            acknowledged=stats.acknowledged,
            refused=stats.refused,
            errors=stats.errors,
            duration_s=duration_s,
            rate_per_s=stats.acknowledged / duration_s if duration_s > 0 else 0.0,
            commands_answered=stats.commands_answered,
            refused_reasons=dict(stats.refused_reasons),
            qos=qos,
        )

    @property
    def ok(self) -> bool:
        """Every sent message acknowledged, nothing refused, no errors."""
        return (
            self.errors == 0
            and self.refused == 0
            and self.acknowledged == self.sent
            and self.connected == self.devices
        )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["duration_s"] = round(self.duration_s, 3)
        values["rate_per_s"] = round(self.rate_per_s, 1)
        return {key: values[key] for key in SUMMARY_KEYS}

    def to_json(self) -> str:
        """One line of JSON with exactly the `SUMMARY_KEYS`."""
        return json.dumps(self.to_dict(), separators=(",", ":"))


def format_summary(summary: FleetSummary) -> str:
    """The human-readable summary, one counter a line."""
    refused = str(summary.refused)
    if summary.refused_reasons:
        reasons = ", ".join(
            f"{name} x{count}" for name, count in sorted(summary.refused_reasons.items())
        )
        refused += f" ({reasons})"
    lines = [
        f"transport     {summary.transport}"
        + (f" (QoS {summary.qos})" if summary.qos is not None else ""),
        f"devices       {summary.devices}",
        f"connected     {summary.connected}",
        f"sent          {summary.sent}",
        f"acknowledged  {summary.acknowledged}",
        f"refused       {refused}",
        f"errors        {summary.errors}",
        f"duration      {summary.duration_s:.2f} s",
        f"rate          {summary.rate_per_s:.1f} acknowledged/s",
        f"commands      {summary.commands_answered} answered",
    ]
    if summary.qos == 0:
        lines.append("note          QoS 0 has no acknowledgement: written counts as acknowledged")
    unacked = summary.sent - summary.acknowledged - summary.refused
    lines.append(
        "result        ok"
        if summary.ok
        else f"result        FAILED ({max(unacked, 0)} unacknowledged, "
        f"{summary.devices - summary.connected} never connected)"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class Progress:
    """A progress report; `rate_per_s` is acknowledgements per second since the last one."""

    elapsed_s: float
    devices: int
    connected: int
    online: int
    sent: int
    acknowledged: int
    refused: int
    errors: int
    rate_per_s: float


def format_progress(p: Progress) -> str:
    return (
        f"{p.elapsed_s:7.1f}s  online {p.online}/{p.devices}  sent {p.sent}  "
        f"acked {p.acknowledged}  refused {p.refused}  errors {p.errors}  "
        f"{p.rate_per_s:.0f} acked/s"
    )


ProgressCallback = Callable[[Progress], None]


async def report_progress(
    stats: FleetStats, started: float, callback: ProgressCallback, interval_s: float
) -> None:
    """Call `callback` every `interval_s` with the counters; runs until cancelled."""
    loop = asyncio.get_running_loop()
    last_acked, last_at = stats.acknowledged, started
    while True:
        await asyncio.sleep(interval_s)
        now = loop.time()
        rate = (stats.acknowledged - last_acked) / (now - last_at) if now > last_at else 0.0
        last_acked, last_at = stats.acknowledged, now
        callback(
            Progress(
                elapsed_s=now - started,
                devices=stats.devices,
                connected=stats.connected,
                online=stats.online,
                sent=stats.sent,
                acknowledged=stats.acknowledged,
                refused=stats.refused,
                errors=stats.errors,
                rate_per_s=rate,
            )
        )
