"""Running fleets of simulated devices: the shared device life cycle, pacing, counters and summary.

Layer: firmware simulator; imports the hub core only (through the device
modules), never bridges or tasks.

A fleet is many `SimulatedDevice`s (TCP or MQTT) run concurrently on one event
loop. They share a `FleetStats` of counters, which the runner turns into a
`FleetSummary` at the end and into progress reports on the way.

The life cycle every device follows, whatever its transport:

1. Connect (no faster than the fleet's connect rate), authenticate.
2. Send telemetry, paced by `RatePacer`, with at most `window` messages
   unacknowledged.
3. On a lost connection, reconnect after a backoff (0.2 s doubling to 5 s,
   jittered) and resend every unacknowledged message unchanged: delivery is
   at-least-once and the hub deduplicates by (device, boot id, seq).
4. When the messages are sent, the duration is over or `stop` is set: wait,
   bounded by `drain_timeout_s`, for the outstanding acknowledgements, then
   disconnect. With `linger`, stay connected answering commands until `stop`
   or the duration ends.

A device gives up (counting an error) when it has made no progress (no
acknowledgement, no clean connect) for `give_up_s`, so a run against a hub
that is down ends instead of retrying forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import json
import logging
import random
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from firmware_sim.commands import CommandAnswer, SimState, answer

__all__ = [
    "AckHook",
    "Backoff",
    "ConnectLimiter",
    "FleetStats",
    "FleetSummary",
    "Progress",
    "RatePacer",
    "SimulatedDevice",
    "device_ids",
    "format_progress",
    "format_summary",
    "run_fleet",
    "run_mqtt_device",
    "run_mqtt_fleet",
    "run_tcp_device",
    "run_tcp_fleet",
]

log = logging.getLogger("firmware_sim")

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


def device_ids(prefix: str, count: int) -> list[str]:
    """`<prefix>1` ... `<prefix><count>`: devices are numbered from 1."""
    return [f"{prefix}{n}" for n in range(1, count + 1)]


# ---------------------------------------------------------------------------
# Counters and summary
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Pacing
# ---------------------------------------------------------------------------


class RatePacer:
    """When a device may send its next message, for `rate` messages per second.

    Times are explicit arguments (the event loop's clock), so the arithmetic is
    testable without sleeping. The schedule is absolute (`next += interval`),
    so the rate does not drift with scheduling delays; after a stall (a full
    window, a reconnect) it catches up by at most `burst` messages at once
    instead of flooding the hub with everything it missed.
    """

    def __init__(self, rate: float = 0.0, *, burst: int = 1) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._burst = max(burst, 1)
        self._next = 0.0

    @property
    def interval_s(self) -> float:
        """Seconds between messages; 0 when unlimited."""
        return self._interval

    def start(self, now: float, phase: float = 0.0) -> None:
        """Schedule the first message at `now + phase * interval` (phase in [0, 1)).

        A random phase per device spreads a fleet's messages over the interval
        instead of every device sending at the same instant.
        """
        self._next = now + phase * self._interval

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate; the next message is due one new interval after the last one."""
        old = self._interval
        self._interval = 1.0 / rate if rate > 0 else 0.0
        last = self._next - old
        self._next = max(now, last + self._interval) if self._interval else now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next message may be sent (0 if it may go now)."""
        if not self._interval:
            return 0.0
        return max(0.0, self._next - now)

    def consume(self, now: float) -> None:
        """Record that a message was sent at `now`."""
        if not self._interval:
            return
        earliest = now - self._burst * self._interval
        self._next = max(self._next, earliest) + self._interval


class Backoff:
    """Reconnect delays: 0.2 s doubling to 5 s; `reset()` after a successful connect."""

    def __init__(self, first: float = 0.2, maximum: float = 5.0) -> None:
        self.first = first
        self.maximum = maximum
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.first


class ConnectLimiter:
    """Spaces new connections (fleet-wide) at `rate` per second.

    Each caller reserves the next free slot before sleeping, so no lock is
    needed and callers are served in order.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("connect rate must be > 0")
        self._interval = 1.0 / rate
        self._next = 0.0

    def reserve(self, now: float) -> float:
        """Reserve a slot; returns how long to wait for it."""
        slot = max(now, self._next)
        self._next = slot + self._interval
        return slot - now

    async def acquire(self) -> None:
        delay = self.reserve(asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)


# ---------------------------------------------------------------------------
# The device life cycle, shared by the transports
# ---------------------------------------------------------------------------


class ConnectionEnd(enum.Enum):
    """How one connection of a device ended."""

    DONE = "done"  # finished normally: do not reconnect
    RETRY = "retry"  # lost or failed (already counted): reconnect after a backoff
    REFUSED = "refused"  # refused for good (unknown device, bad credential)


T = TypeVar("T")

#: Called once per telemetry message when its acknowledgement arrives, with
#: (device id, boot id, seq): lets a test record exactly what the hub acknowledged.
AckHook = Callable[[str, int, int], None]

# How long a connection may have messages outstanding without any ACK before
# the device assumes it is dead and reconnects, as real firmware would.
DEFAULT_ACK_TIMEOUT_S = 30.0


class SimulatedDevice(ABC, Generic[T]):
    """One simulated device: the transport-independent life cycle (see the module doc).

    Subclasses implement `_connection()` (one connection: connect, authenticate,
    resend `_resend_list()`, run `_pump()`, close), `_make_message()`,
    `_transmit()` and `_connection_lost()`. `T` is what they keep per
    outstanding message, so that a resend is identical to the original.
    """

    transport: ClassVar[str] = "?"

    def __init__(
        self,
        device_id: str,
        credential: str,
        *,
        messages: int | None = None,
        duration_s: float | None = None,
        rate: float = 0.0,
        window: int = 64,
        linger: bool = False,
        stats: FleetStats | None = None,
        stop: asyncio.Event | None = None,
        connect_limiter: ConnectLimiter | None = None,
        connect_timeout_s: float = 10.0,
        drain_timeout_s: float = 30.0,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        give_up_s: float | None = 60.0,
        on_acknowledged: AckHook | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if messages is not None and messages < 0:
            raise ValueError("messages must be >= 0")
        self.device_id = device_id
        self.credential = credential
        self.messages = messages
        self.duration_s = duration_s
        self.window = window
        self.linger = linger
        self.stats = stats if stats is not None else FleetStats()
        self.stop = stop
        self.connect_limiter = connect_limiter
        self.connect_timeout_s = connect_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.give_up_s = give_up_s
        self.on_acknowledged = on_acknowledged

        # A real device picks its boot id from hardware entropy at power-up;
        # it must differ between runs, or the hub would take a new run's
        # messages for retransmissions of the last one's.
        boot_id = secrets.randbelow(0xFFFF_FFFF) + 1
        self.state = SimState(device_id, boot_id, interval_s=1.0 / rate if rate > 0 else None)
        self.rng = random.Random()
        self.pacer = RatePacer(rate)
        self.backoff = Backoff()
        #: The NAK reason or CONNACK code that refused this device, if one did.
        self.refused_reason: str | None = None
        self.gave_up = False
        self.connected_once = False

        self._outstanding: dict[int, T] = {}
        self._seq = 0
        self._generated = 0
        self._online = False
        self._wake = asyncio.Event()
        self._started = 0.0
        self._deadline: float | None = None
        self._drain_until: float | None = None
        self._last_ack_at = 0.0
        self._last_progress = 0.0
        self._stalled: str | None = None

    # -- public ------------------------------------------------------------

    @property
    def boot_id(self) -> int:
        return self.state.boot_id

    @property
    def outstanding(self) -> int:
        """Telemetry messages sent but not yet acknowledged."""
        return len(self._outstanding)

    async def run(self) -> None:
        """Run the device to the end of its life cycle (see the module doc)."""
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        self._last_progress = self._started
        self._last_ack_at = self._started
        if self.duration_s is not None:
            self._deadline = self._started + self.duration_s
        self.pacer.start(self._started, self.rng.random())
        watcher = asyncio.create_task(self._watch_stop()) if self.stop is not None else None
        try:
            while not self._finished():
                if self._should_give_up():
                    break
                if self.connect_limiter is not None:
                    await self.connect_limiter.acquire()
                end = await self._connection()
                if end is not ConnectionEnd.RETRY:
                    break
                await self._backoff_wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            self._set_online(False)
            self.stats.finished += 1

    # -- for subclasses ----------------------------------------------------

    @abstractmethod
    async def _connection(self) -> ConnectionEnd:
        """One connection, from connect to close."""

    @abstractmethod
    def _make_message(self, seq: int, values: dict[str, float]) -> T:
        """The outstanding-message record for a new telemetry message."""

    @abstractmethod
    async def _transmit(self, seq: int, message: T) -> None:
        """Put one telemetry message on the current connection."""

    @abstractmethod
    def _connection_lost(self) -> bool:
        """True once the current connection is gone."""

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _next_seq(self) -> int:
        """The next sequence number. One counter for every data frame of a boot,
        so that telemetry and command results never share a (boot id, seq)."""
        self._seq += 1
        return self._seq

    def _note_error(self, what: str) -> None:
        self.stats.errors += 1
        log.info("%s: %s", self.device_id, what)

    def _connection_failed(self, link_failure: str | None) -> None:
        """Count a connection that ended in RETRY as one error, with the best reason known."""
        reason = self._stalled or link_failure or "connection lost"
        self._stalled = None
        self._note_error(reason)

    def _refused(self, reason: str) -> None:
        self.stats.refused += 1
        self.stats.refused_reasons[reason] += 1
        log.info("%s: refused: %s", self.device_id, reason)

    def _on_accepted(self) -> None:
        """The hub accepted the device on this connection."""
        now = self._now()
        self.backoff.reset()
        self._last_ack_at = now
        # A clean connect with nothing outstanding is progress; one that only
        # leads to more unacknowledged resends is not (see `give_up_s`).
        if not self._outstanding:
            self._last_progress = now
        if not self.connected_once:
            self.connected_once = True
            self.stats.connected += 1
        self._set_online(True)
        self._wake.set()

    def _on_closed(self) -> None:
        self._set_online(False)
        self._wake.set()

    def _set_online(self, online: bool) -> None:
        if online != self._online:
            self._online = online
            self.stats.online += 1 if online else -1

    def _acknowledge(self, seq: int) -> bool:
        """An ACK for `seq`; True if it acknowledged an outstanding telemetry message."""
        if self._outstanding.pop(seq, None) is None:
            return False
        self.stats.acknowledged += 1
        self.state.acknowledged += 1
        if self.on_acknowledged is not None:
            self.on_acknowledged(self.device_id, self.boot_id, seq)
        now = self._now()
        self._last_ack_at = now
        self._last_progress = now
        self._wake.set()
        return True

    def _refuse_message(self, seq: int, reason: str) -> None:
        """A NAK for a message: it is refused for good, not resent."""
        self._outstanding.pop(seq, None)
        self._refused(reason)
        self._last_ack_at = self._now()
        self._wake.set()

    def _answer_command(self, name: str, args: Any) -> CommandAnswer:
        result = answer(self.state, name, args)
        self.stats.commands_answered += 1
        # `set_interval` may have changed the pace: let `_pump` reschedule now.
        self._wake.set()
        return result

    def _resend_list(self) -> list[tuple[int, T]]:
        """Every unacknowledged message, oldest first, for a new connection."""
        return list(self._outstanding.items())

    async def _wait(self, until: float | None) -> None:
        """Sleep until `until` (loop time; None = no limit) or until something changes.

        Callers check their condition, then call this with no await in
        between, so clearing the flag here cannot lose a wake-up.
        """
        if until is not None and until <= self._now():
            await asyncio.sleep(0)
            return
        self._wake.clear()
        if until is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self._wake.wait()

    async def _wait_for(self, predicate: Callable[[], bool], within_s: float) -> bool:
        """Wait until `predicate()` holds (True) or `within_s` passed (False)."""
        until = self._now() + within_s
        while not predicate():
            if self._now() >= until:
                return False
            await self._wait(until)
        return True

    async def _pump(self) -> ConnectionEnd:
        """Send telemetry on the current connection until done, stalled or lost."""
        while True:
            if self._connection_lost():
                return ConnectionEnd.RETRY
            now = self._now()
            if not self._active(now):
                if self._finished():
                    return ConnectionEnd.DONE
                await self._wait(self._drain_until)
                continue
            if self._all_generated():
                # Lingering: stay connected, answering commands.
                await self._wait(self._deadline)
                continue
            if len(self._outstanding) >= self.window:
                if now - self._last_ack_at >= self.ack_timeout_s:
                    self._stalled = f"no acknowledgement for {self.ack_timeout_s:g} s; reconnecting"
                    return ConnectionEnd.RETRY
                await self._wait(_earliest(self._deadline, self._last_ack_at + self.ack_timeout_s))
                continue
            self._sync_pacer(now)
            delay = self.pacer.delay(now)
            if delay > 0:
                await self._wait(_earliest(self._deadline, now + delay))
                continue
            self.pacer.consume(now)
            seq = self._next_seq()
            message = self._make_message(seq, self.state.next_reading(self.rng))
            if not self._outstanding:
                # The ack timeout measures silence while something is owed.
                self._last_ack_at = now
            self._outstanding[seq] = message
            self._generated += 1
            self.state.sent += 1
            self.stats.sent += 1
            await self._transmit(seq, message)

    # -- internals ---------------------------------------------------------

    def _sync_pacer(self, now: float) -> None:
        interval = self.state.interval_s
        if interval and abs(self.pacer.interval_s - interval) > 1e-12:
            self.pacer.set_rate(1.0 / interval, now)

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _all_generated(self) -> bool:
        return self.messages is not None and self._generated >= self.messages

    def _active(self, now: float) -> bool:
        """Still in the sending (or lingering) phase."""
        if self._stopping() or (self._deadline is not None and now >= self._deadline):
            return False
        return self.linger or not self._all_generated()

    def _finished(self) -> bool:
        if self.refused_reason is not None or self.gave_up:
            return True
        now = self._now()
        if self._active(now):
            return False
        if (
            not self.connected_once
            and not self._stopping()
            and (self._deadline is None or now < self._deadline)
        ):
            # Connect at least once even with nothing to send: `messages=0`
            # makes a connect-only fleet (a connection storm test).
            return False
        if self._drain_until is None:
            self._drain_until = now + self.drain_timeout_s
        return not self._outstanding or now >= self._drain_until

    def _should_give_up(self) -> bool:
        if self.give_up_s is None:
            return False
        if self._now() - self._last_progress < self.give_up_s:
            return False
        self.gave_up = True
        self._note_error(f"gave up: no progress for {self.give_up_s:g} s")
        return True

    async def _backoff_wait(self) -> None:
        # Jitter keeps a fleet that lost the hub at once from reconnecting in lockstep.
        until = self._now() + self.backoff.next_delay() * self.rng.uniform(0.5, 1.0)
        while self._now() < until and not self._finished():
            await self._wait(until)

    async def _watch_stop(self) -> None:
        assert self.stop is not None
        await self.stop.wait()
        self._wake.set()


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


# ---------------------------------------------------------------------------
# Fleet runners
# ---------------------------------------------------------------------------

ProgressCallback = Callable[[Progress], None]


async def _report_progress(
    stats: FleetStats, started: float, callback: ProgressCallback, interval_s: float
) -> None:
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


async def run_fleet(
    devices: Sequence[SimulatedDevice[Any]],
    *,
    transport: str,
    stats: FleetStats,
    progress: ProgressCallback | None = None,
    progress_interval_s: float = 2.0,
    qos: int | None = None,
) -> FleetSummary:
    """Run already built devices that share `stats` to the end; the summary."""
    loop = asyncio.get_running_loop()
    stats.devices = len(devices)
    started = loop.time()
    reporter = (
        asyncio.create_task(_report_progress(stats, started, progress, progress_interval_s))
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


def _check_bounds(messages: int | None, duration_s: float | None, stop: object) -> None:
    if messages is None and duration_s is None and stop is None:
        raise ValueError("give messages, duration_s or a stop event, or the fleet never ends")


async def run_tcp_fleet(
    host: str,
    port: int,
    devices: Sequence[tuple[str, str]],
    *,
    messages: int | None = None,
    duration_s: float | None = None,
    rate: float = 0.0,
    window: int = 64,
    codec: str = "native",
    connect_rate: float | None = None,
    stop: asyncio.Event | None = None,
    stats: FleetStats | None = None,
    progress: ProgressCallback | None = None,
    progress_interval_s: float = 2.0,
    linger: bool = False,
    keepalive_s: float = 30.0,
    drain_timeout_s: float = 30.0,
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
    give_up_s: float | None = 60.0,
) -> FleetSummary:
    """Run `(device id, credential)` devices over TCP against `host:port`.

    Each device sends `messages` telemetry messages (or sends for
    `duration_s`), `rate` per second (0: as fast as `window` and the ACKs
    allow). Set `stop` to end the run early (outstanding ACKs are still
    awaited, up to `drain_timeout_s`). Pass your own `stats` to watch the
    counters live, e.g. to wait until `stats.online == len(devices)`.
    """
    from firmware_sim.tcp_device import TcpDevice  # the device modules build on this one

    _check_bounds(messages, duration_s, stop)
    stats = stats if stats is not None else FleetStats()
    limiter = ConnectLimiter(connect_rate) if connect_rate else None
    fleet = [
        TcpDevice(
            host,
            port,
            device_id,
            credential,
            codec=codec,
            keepalive_s=keepalive_s,
            messages=messages,
            duration_s=duration_s,
            rate=rate,
            window=window,
            linger=linger,
            stats=stats,
            stop=stop,
            connect_limiter=limiter,
            drain_timeout_s=drain_timeout_s,
            ack_timeout_s=ack_timeout_s,
            give_up_s=give_up_s,
        )
        for device_id, credential in devices
    ]
    return await run_fleet(
        fleet,
        transport="tcp",
        stats=stats,
        progress=progress,
        progress_interval_s=progress_interval_s,
    )


async def run_mqtt_fleet(
    host: str,
    port: int,
    devices: Sequence[tuple[str, str]],
    *,
    messages: int | None = None,
    duration_s: float | None = None,
    rate: float = 0.0,
    window: int = 64,
    qos: int = 1,
    topic_root: str = "devices",
    connect_rate: float | None = None,
    stop: asyncio.Event | None = None,
    stats: FleetStats | None = None,
    progress: ProgressCallback | None = None,
    progress_interval_s: float = 2.0,
    linger: bool = False,
    keepalive_s: int = 30,
    drain_timeout_s: float = 30.0,
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
    give_up_s: float | None = 60.0,
) -> FleetSummary:
    """Run `(device id, credential)` devices over MQTT against the broker at `host:port`.

    Like `run_tcp_fleet`. At `qos=1` a message is acknowledged by its PUBACK;
    at `qos=0` there is no acknowledgement and a message counts as
    acknowledged once written to the socket.
    """
    from firmware_sim.mqtt_device import MqttDevice  # the device modules build on this one

    _check_bounds(messages, duration_s, stop)
    stats = stats if stats is not None else FleetStats()
    limiter = ConnectLimiter(connect_rate) if connect_rate else None
    fleet = [
        MqttDevice(
            host,
            port,
            device_id,
            credential,
            qos=qos,
            topic_root=topic_root,
            keepalive_s=keepalive_s,
            messages=messages,
            duration_s=duration_s,
            rate=rate,
            window=window,
            linger=linger,
            stats=stats,
            stop=stop,
            connect_limiter=limiter,
            drain_timeout_s=drain_timeout_s,
            ack_timeout_s=ack_timeout_s,
            give_up_s=give_up_s,
        )
        for device_id, credential in devices
    ]
    return await run_fleet(
        fleet,
        transport="mqtt",
        stats=stats,
        progress=progress,
        progress_interval_s=progress_interval_s,
        qos=qos,
    )


async def run_tcp_device(
    host: str,
    port: int,
    device_id: str,
    credential: str,
    *,
    stop: asyncio.Event,
    messages: int | None = 0,
    rate: float = 0.0,
    codec: str = "native",
    stats: FleetStats | None = None,
    keepalive_s: float = 30.0,
    give_up_s: float | None = 60.0,
) -> FleetSummary:
    """One long-lived TCP device: sends `messages` (None: until stopped) at `rate`,
    answers commands and pings, reconnects when dropped, until `stop` is set."""
    return await run_tcp_fleet(
        host,
        port,
        [(device_id, credential)],
        messages=messages,
        rate=rate,
        codec=codec,
        stop=stop,
        stats=stats,
        linger=True,
        keepalive_s=keepalive_s,
        give_up_s=give_up_s,
    )


async def run_mqtt_device(
    host: str,
    port: int,
    device_id: str,
    credential: str,
    *,
    stop: asyncio.Event,
    messages: int | None = 0,
    rate: float = 0.0,
    qos: int = 1,
    topic_root: str = "devices",
    stats: FleetStats | None = None,
    give_up_s: float | None = 60.0,
) -> FleetSummary:
    """One long-lived MQTT device, like `run_tcp_device`."""
    return await run_mqtt_fleet(
        host,
        port,
        [(device_id, credential)],
        messages=messages,
        rate=rate,
        qos=qos,
        topic_root=topic_root,
        stop=stop,
        stats=stats,
        linger=True,
        give_up_s=give_up_s,
    )
