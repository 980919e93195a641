"""How many MQTT connections may be in their handshake at once: the rest wait their turn.

Layer: bridges; imports asyncio only (no amqtt), so it is unit-tested on its own
(tests/unit).

A connection storm (every device reconnecting at once after a restart of the
hub) put thousands of handshakes on the event loop together: each one's
CONNECT, authentication and CONNACK were interleaved with all the others', so
every CONNACK came late, clients gave up and connected again, and the hub
worked for connections already abandoned while its connected devices'
publishes waited behind them. `HandshakeGate` admits at most
`mqtt_max_handshakes` (from reading the CONNECT to sending the CONNACK) and
lets the others wait: none is refused for it, and the handshakes in progress
finish in the time of a few rather than of all.

The newest waiting connection goes first. When more connect than the hub can
answer within a device's CONNACK timeout, first come first served answers
only connections whose devices have already given up (each reconnect joins
the back of the queue, and the storm never ends); newest first answers the
devices still waiting, and those that gave up come back as new ones. The
listener closes, without a handshake, a connection whose device has already
closed it (`abandoned`).

The listener reads each connection's CONNECT first (within the CONNECT
timeout: a silent socket holds no place), then takes a place (`enter`) and
gives it back at the latest when the connection ends; the
session code gives it back as soon as the CONNACK is written (`leave`), which
it finds through a context variable: each connection is served by a task of
its own, and amqtt's code between the two knows nothing of the gate.
"""

from __future__ import annotations

import asyncio
import contextvars

__all__ = ["HandshakeGate", "leave"]


class _Place:
    """One connection's place in the gate; given back once."""

    __slots__ = ("_gate", "held")

    def __init__(self, gate: HandshakeGate) -> None:
        self._gate = gate
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._gate._give_back()


_PLACE: contextvars.ContextVar[_Place | None] = contextvars.ContextVar(
    "hub_mqtt_handshake", default=None
)


class _Entry:
    """The block of `HandshakeGate.enter`. A class with slots, not an
    `asynccontextmanager`: the block lasts as long as the connection, and a
    suspended generator with its frame cost each connection about 0.7 KB."""

    __slots__ = ("_gate", "_place", "_token")

    def __init__(self, gate: HandshakeGate) -> None:
        self._gate = gate
        self._place: _Place | None = None
        self._token: contextvars.Token[_Place | None] | None = None

    async def __aenter__(self) -> bool:
        waited = await self._gate._acquire()
        self._place = _Place(self._gate)
        self._token = _PLACE.set(self._place)
        return waited

    async def __aexit__(self, *_exc: object) -> None:
        if self._token is not None:
            _PLACE.reset(self._token)
            self._token = None
        if self._place is not None:
            self._place.release()


class HandshakeGate:
    """At most `limit` handshakes at once; the others wait, the newest first."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the handshake limit must be at least 1")
        self.limit = limit
        self.in_progress = 0
        # Futures of the connections waiting, oldest first; served from the end.
        self._waiting: list[asyncio.Future[None]] = []

    @property
    def waiting(self) -> int:
        """Connections waiting for a place (some may have been cancelled)."""
        return len(self._waiting)

    def enter(self) -> _Entry:
        """`async with gate.enter() as waited`: hold a place for the connection
        served by the current task until `leave` or the end of the block,
        whichever comes first; the block gets whether the connection had to
        wait for it."""
        return _Entry(self)

    async def _acquire(self) -> bool:
        if self.in_progress < self.limit:
            self.in_progress += 1
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # `_give_back` hands its place on: in_progress counts it already
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give_back()  # handed a place just as it was cancelled: pass it on
            else:
                self._waiting.remove(turn)
            raise
        return True

    def _give_back(self) -> None:
        if self._waiting:
            self._waiting.pop().set_result(None)
        else:
            self.in_progress -= 1


def leave() -> None:
    """The current connection's handshake is over (CONNACK written): its place
    goes to the next connection waiting. Nothing outside a gate's `enter`."""
    place = _PLACE.get()
    if place is not None:
        place.release()
