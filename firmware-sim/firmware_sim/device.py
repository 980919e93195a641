"""The device base shared by the TCP and MQTT devices: the life cycle.

Layer: firmware simulator; imports the simulator's `commands`, `options`,
`pacing` and `summary` only. Never imports `firmware_sim.fleet`
or a device module (they build on this one).

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

What a device writes goes through `firmware_sim.outbox`, the fault seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from firmware_sim.commands import CommandAnswer, SimState, answer
from firmware_sim.options import FleetOptions
from firmware_sim.pacing import Backoff, ConnectLimiter, RatePacer
from firmware_sim.summary import FleetStats

__all__ = ["AckHook", "ConnectionEnd", "SimulatedDevice"]

log = logging.getLogger("firmware_sim")


class ConnectionEnd(enum.Enum):
    """How one connection of a device ended."""

    DONE = "done"  # finished normally: do not reconnect
    RETRY = "retry"  # lost or failed (already counted): reconnect after a backoff
    REFUSED = "refused"  # refused for good (unknown device, bad credential)


T = TypeVar("T")

#: Called once per telemetry message when its acknowledgement arrives, with
#: (device id, boot id, seq): lets a test record exactly what the hub acknowledged.
AckHook = Callable[[str, int, int], None]


class SimulatedDevice(ABC, Generic[T]):
    """One simulated device: the transport-independent life cycle (see the module doc).

    Subclasses implement `_connection()` (one connection: connect, authenticate,
    resend `_resend_list()`, run `_pump()`, close), `_make_message()`,
    `_transmit()` and `_connection_lost()`. `T` is what they keep per
    outstanding message, so that a resend is identical to the original.
    The settings come from `options` (its `devices`, `host` and `port` are
    the fleet's business, not read here).
    """

    transport: ClassVar[str] = "?"

    def __init__(
        self,
        device_id: str,
        credential: str,
        options: FleetOptions,
        *,
        stats: FleetStats | None = None,
        stop: asyncio.Event | None = None,
        connect_limiter: ConnectLimiter | None = None,
        on_acknowledged: AckHook | None = None,
    ) -> None:
        self.device_id = device_id
        self.credential = credential
        self.options = options
        self.messages = options.messages
        self.duration_s = options.duration_s
        self.window = options.window
        self.linger = options.linger
        self.stats = stats if stats is not None else FleetStats()
        self.stop = stop
        self.connect_limiter = connect_limiter
        self.connect_timeout_s = options.connect_timeout_s
        self.drain_timeout_s = options.drain_timeout_s
        self.ack_timeout_s = options.ack_timeout_s
        self.give_up_s = options.give_up_s
        self.on_acknowledged = on_acknowledged
        rate = options.rate

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

    @classmethod
    def summary_qos(cls, options: FleetOptions) -> int | None:
        """The QoS the fleet's summary reports (None: the transport has none)."""
        return None

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
