"""Pacing of a simulated fleet: message rate, reconnect backoff, connect rate.

Layer: firmware simulator; imports nothing of the project (standard library
only). The arithmetic takes the loop's clock as an argument, so it is tested
without sleeping.
"""

from __future__ import annotations

import asyncio

__all__ = ["Backoff", "ConnectLimiter", "RatePacer"]


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
