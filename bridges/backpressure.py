"""Room in the dispatcher: the one bound on envelopes between the devices and RabbitMQ.

Layer: bridges; imports asyncio only, so it is unit-tested on its own.

Each connection bounds its own unacknowledged messages
(`max_inflight_per_connection`), but a QoS 0 publish is never acknowledged
and a thousand connections at 256 each would be a quarter of a million
envelopes in memory. The dispatcher counts every envelope it accepted and has
not yet made durable (open batches, batches handed to its thread, a batch
waiting for room in a full spool) in one `Room`; when that count reaches
`dispatch_max_pending_messages` the room is *full*, and every device
connection stops reading, on both transports, until the count is back at
half the bound. Nothing is dropped: a device that is not read stops sending
(TCP's own flow control), and its messages stay with it. See
docs/delivery.md, "Bounds and backpressure".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Room:
    """How many envelopes the dispatcher holds, and whether it takes more."""

    __slots__ = ("_event", "_limit", "_low", "_on_full", "_waiters", "full", "pending")

    def __init__(self, limit: int, *, on_full: Callable[[], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("the bound must be at least 1")
        self._limit = limit
        # Reopen at half: a room that reopened at limit - 1 would close again
        # at the next envelope, and every connection would pause and resume
        # once per batch.
        self._low = limit // 2
        self.pending = 0
        self.full = False
        #: Called each time the room fills (a counter in the metrics).
        self._on_full = on_full
        self._event: asyncio.Event | None = None
        self._waiters: dict[object, Callable[[], None]] = {}

    @property
    def limit(self) -> int:
        return self._limit

    def taken(self, count: int = 1) -> None:
        """`count` envelopes accepted (the dispatcher's side)."""
        self.pending += count
        if not self.full and self.pending >= self._limit:
            self.full = True
            if self._on_full is not None:
                self._on_full()
            if self._event is not None:
                self._event.clear()

    def released(self, count: int) -> None:
        """`count` envelopes made durable, or given up (the dispatcher's side)."""
        self.pending = max(0, self.pending - count)
        if self.full and self.pending <= self._low:
            self.full = False
            if self._event is not None:
                self._event.set()
            waiters, self._waiters = self._waiters, {}
            for resume in waiters.values():
                resume()

    async def wait(self) -> None:
        """Return once the room takes envelopes again (at once when it does)."""
        if not self.full:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def call_when_open(self, key: object, resume: Callable[[], None]) -> None:
        """Call `resume` once the room is open again (`key`: one call per
        connection, however often it asks). At once when it is open."""
        if not self.full:
            resume()
            return
        self._waiters[key] = resume

    def forget(self, key: object) -> None:
        """A connection that closed no longer waits."""
        self._waiters.pop(key, None)
