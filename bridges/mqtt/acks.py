"""The acknowledgement sequencer: one connection's PUBACKs, in order, coalesced per batch.

Layer: bridges; imports asyncio and the `hub` core only (no amqtt: it writes
through a plain callable), so it is unit-tested on its own.

MQTT 3.1.1 asks a server to send the PUBACKs of one connection in the order
the QoS 1 PUBLISHes came (section 4.6, message ordering), and the hub may
acknowledge a message only once it is durable (docs/delivery.md). A
connection's QoS 1 PUBLISHes reach it two ways (docs/mqtt.md, "The fast
path"):

- **fast**: read by the packet reader and submitted straight to the
  dispatcher; the sequencer writes its PUBACK itself once the dispatcher's
  future is done (`add_fast`);
- **slow**: handed to amqtt, whose per-packet task writes the PUBACK through
  its own flow; that task waits for its turn here (`add_slow`, then
  `SlowTurn.wait` and `finish`).

Every QoS 1 PUBLISH takes one place in one queue, in the order read. The
head of the queue is written as soon as it may be: consecutive fast entries
whose futures are done are written together, in one write, in queue order;
a slow entry at the head is told its turn and holds the entries behind it
until its task has written its own PUBACK. The futures of one dispatcher
batch resolve in one turn of the event loop, and the sequencer writes once
after them (a `call_soon`), so a connection gets one write per batch.

The queue is bounded by backpressure: while `max_inflight` PUBLISHes wait
for their PUBACK, or while more than `DRAIN_BYTES` were written without the
client reading them, the connection is not read any further
(`pause`/`resume` of its reader). After `close` nothing is written any more
(the connection ended or was taken over: the device sends the messages
again, and their `seq` deduplicates them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Bytes written by the sequencer after which it waits for the client to
#: read them (a drain) before the connection is read further.
DRAIN_BYTES = 65536


class Pausable(Protocol):
    """What the sequencer pauses: the connection's reader (bridges.mqtt.reader)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class SlowTurn:
    """A place in the queue for a PUBLISH amqtt acknowledges itself."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = asyncio.Event()

    async def wait(self) -> None:
        """Return once every PUBACK before this one is written."""
        await self._turn.wait()


class _Fast:
    __slots__ = ("future", "packet_id")

    def __init__(self, packet_id: int, future: asyncio.Future[None] | None) -> None:
        self.packet_id = packet_id
        self.future = future


class AckSequencer:
    """One connection's queue of PUBACKs to send; see the module docstring."""

    __slots__ = (
        "_drain",
        "_draining",
        "_flush_scheduled",
        "_judge",
        "_max_inflight",
        "_on_acked",
        "_paused",
        "_queue",
        "_reader",
        "_unflushed_bytes",
        "_watched",
        "_write",
        "closed",
    )  # fmt: skip

    def __init__(
        self,
        *,
        write: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        judge: Callable[[asyncio.Future[None]], bool],
        max_inflight: int,
        on_acked: Callable[[int], None] | None = None,
    ) -> None:
        #: Writes bytes to the connection at once (whole packets only).
        self._write = write
        self._drain = drain
        #: Whether a done future's message may be acknowledged (logs a failure).
        self._judge = judge
        self._on_acked = on_acked
        self._max_inflight = max_inflight
        # `_queue`, made on first use (`__getattr__`): an empty deque takes
        # about 760 bytes, and most connections never publish at QoS 1.
        self._reader: Pausable | None = None
        self._paused = False
        self._flush_scheduled = False
        self._unflushed_bytes = 0
        self._draining: asyncio.Task[None] | None = None
        self._watched: asyncio.Future[None] | None = None
        self.closed = False

    _queue: deque[_Fast | SlowTurn]

    def __getattr__(self, name: str) -> Any:
        # Only called for a slot not set yet.
        if name != "_queue":
            raise AttributeError(name)
        self._queue = deque()
        return self._queue

    def attach(self, reader: Pausable) -> None:
        """The reader to pause while too much waits (backpressure)."""
        self._reader = reader

    @property
    def pending(self) -> int:
        """QoS 1 PUBLISHes of the connection waiting for their PUBACK."""
        return len(self._queue)

    # -- entries --------------------------------------------------------------------------

    def add_fast(self, packet_id: int, future: asyncio.Future[None] | None) -> None:
        """A PUBLISH whose PUBACK this sequencer writes: once `future` is done
        and may be acknowledged (`judge`), or, with no future (nothing to make
        durable: an invalid payload), as soon as its turn comes."""
        entry = _Fast(packet_id, future)
        self._queue.append(entry)
        if future is None or future.done():
            self._schedule_flush()
        elif future is not self._watched:
            # A batch's envelopes may share one future: one callback for them all.
            self._watched = future
            future.add_done_callback(self._future_done)
        self._update_pause()

    def add_slow(self) -> SlowTurn:
        """A place for a PUBLISH amqtt acknowledges: wait for its turn, write
        the PUBACK, then `finish` it (in a `finally`)."""
        turn = SlowTurn()
        self._queue.append(turn)
        if self._queue[0] is turn:
            turn._turn.set()
        self._update_pause()
        return turn

    def finish(self, turn: SlowTurn) -> None:
        """The slow PUBLISH's flow is over (PUBACK written or given up)."""
        try:
            self._queue.remove(turn)
        except ValueError:
            return  # closed meanwhile
        self._flush()

    def close(self) -> None:
        """The connection ended: write nothing more, let slow tasks go."""
        if self.closed:
            return
        self.closed = True
        for entry in self._queue:
            if isinstance(entry, SlowTurn):
                entry._turn.set()
        self._queue.clear()
        if self._draining is not None:
            self._draining.cancel()
        self._update_pause()

    # -- writing ----------------------------------------------------------------------

    def _future_done(self, _future: asyncio.Future[None]) -> None:
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # The futures of one batch resolve in one loop turn, each with its own
        # callback; flushing after them all makes one write of them.
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed:
            return
        queue = self._queue
        out = bytearray()
        acked = 0
        while queue:
            head = queue[0]
            if isinstance(head, SlowTurn):
                head._turn.set()  # its task writes, then finishes it
                break
            future = head.future
            if future is not None:
                if not future.done():
                    break
                if self._judge(future):
                    acked += 1
                else:
                    queue.popleft()
                    continue  # not durable: no PUBACK (the device sends it again)
            queue.popleft()
            out += b"\x40\x02" + head.packet_id.to_bytes(2, "big")
        if out:
            try:
                self._write(bytes(out))
            except (ConnectionError, RuntimeError):
                self.close()  # the connection is gone; so is its reader
                return
            if acked and self._on_acked is not None:
                self._on_acked(acked)
            self._unflushed_bytes += len(out)
            if self._unflushed_bytes >= DRAIN_BYTES and self._draining is None:
                self._draining = asyncio.ensure_future(self._wait_drained())
        self._update_pause()

    async def _wait_drained(self) -> None:
        self._update_pause()
        try:
            await self._drain()
        except (ConnectionError, RuntimeError):
            pass  # the connection is gone; its reader stops on its own
        finally:
            self._unflushed_bytes = 0
            self._draining = None
            self._update_pause()

    def _update_pause(self) -> None:
        reader = self._reader
        if reader is None:
            return
        pause = not self.closed and (
            len(self._queue) >= self._max_inflight or self._draining is not None
        )
        if pause != self._paused:
            self._paused = pause
            if pause:
                reader.pause()
            else:
                reader.resume()
