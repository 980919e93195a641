"""The fault seam: what a simulated device writes passes through a fault on its way out.

Layer: firmware simulator; imports the simulator's `faults` only. Used by the
TCP device (around its stream writer) and the MQTT device (around the socket
paho writes to); neither imports anything else to inject faults.

An `Outbox` is made per connection, only when the fleet has a `fault`: without
one the devices write straight to their transport, so a normal run costs
nothing here. Each write is handed to the fault; the pieces it returns are
written in order, each at its due time: the time of the write plus the
`Delay`s before it in the fault's answer, never earlier than the piece before
(a delay is latency, not a slower link: pieces of later writes wait only
as long as order demands). A piece the transport takes only in part (a
non-blocking socket that is full) is retried shortly after.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from firmware_sim.faults import Delay, Fault

__all__ = ["FaultySocket", "Outbox", "Write"]

#: Writes `data`; returns how many bytes it took (None: all of them). May raise
#: BlockingIOError when it takes none.
Write = Callable[[bytes], int | None]

# How soon to retry a piece a full socket did not take.
_RETRY_S = 0.005


class Outbox:
    """One connection's writes, through `fault`. Call `send` on the loop's thread."""

    def __init__(self, write: Write, fault: Fault, loop: asyncio.AbstractEventLoop) -> None:
        self._write = write
        self._fault = fault
        self._loop = loop
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._last_due = 0.0
        self.closed = False

    @property
    def pending(self) -> int:
        """Pieces not yet written (held back by a delay or a full socket)."""
        return len(self._queue)

    def send(self, data: bytes) -> None:
        """Hand one write to the fault and put its pieces on the way out."""
        if self.closed:
            return
        due = self._loop.time()
        for piece in self._fault(data):
            if isinstance(piece, Delay):
                due += piece.seconds
            elif piece:
                self._last_due = max(due, self._last_due)
                self._queue.append((self._last_due, piece))
        if self._timer is None:
            self._flush()

    def close(self) -> None:
        """Forget what was not written yet; later sends are ignored."""
        self.closed = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._queue and not self.closed:
            due, piece = self._queue[0]
            if due > now:
                self._timer = self._loop.call_later(due - now, self._flush)
                return
            try:
                taken = self._write(piece)
            except BlockingIOError:
                taken = 0
            except OSError:
                # The connection is gone; its reader notices and reconnects.
                self.close()
                return
            if taken is not None and taken < len(piece):
                self._queue[0] = (due, piece[taken:])
                self._timer = self._loop.call_later(_RETRY_S, self._flush)
                return
            self._queue.popleft()


class FaultySocket:
    """A non-blocking socket whose writes go through an Outbox (the MQTT device's seam).

    Every write is taken whole (the Outbox holds what the real socket cannot
    take yet), so the writer (paho) never sees a partial write; everything else is the
    real socket's.
    """

    def __init__(self, sock: Any, fault: Fault, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._outbox = Outbox(sock.send, fault, loop)

    def send(self, buffer: bytes | bytearray) -> int:
        self._outbox.send(bytes(buffer))
        return len(buffer)

    def recv(self, buffer_size: int) -> bytes:
        data: bytes = self._sock.recv(buffer_size)
        return data

    def fileno(self) -> int:
        fd: int = self._sock.fileno()
        return fd

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._outbox.close()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
