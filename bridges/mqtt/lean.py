"""asyncio's queue and event, made lean: the same behaviour, their memory only when used.

Layer: bridges; imports asyncio only (no amqtt), so it is unit-tested on its
own (tests/unit).

amqtt gives every MQTT session and handler four `asyncio.Queue`s (each makes
two deques of waiters, a deque of items and an `Event` with a deque of its
own at once: about 3 KB even empty) and the hub a few `asyncio.Event`s per
connection; with 10,000 connected devices that is tens of megabytes for
queues that an idle device never uses. `LeanQueue` and `LeanEvent` make
their parts on first use, and keep waiters in a list (an empty deque takes
about 760 bytes, a list 56; there is rarely more than one waiter).
`lean_drain_waiters` does the same for the drain waiters of a stream's
protocol, which every connection holds as long as it lives.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, TypeVar

__all__ = ["LeanEvent", "LeanQueue", "lean_drain_waiters"]

_T = TypeVar("_T")


class _Waiters(list[Any]):
    """The waiters of a `LeanQueue` or `LeanEvent`: a list with the one deque
    method asyncio uses on them. An empty deque takes about 760 bytes, a list
    56, and waiters are rarely more than one."""

    def popleft(self) -> Any:
        return self.pop(0)


class LeanQueue(asyncio.Queue[_T]):
    """An `asyncio.Queue` whose deques and `Event` are made when first used:
    the same behaviour, none of their memory in a queue never used."""

    def __init__(self, maxsize: int = 0) -> None:
        # Not asyncio.Queue.__init__, which makes them all at once.
        self._maxsize = maxsize
        self._unfinished_tasks = 0

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not set yet.
        value: Any
        if name in ("_getters", "_putters"):
            value = _Waiters()
        elif name == "_queue":
            value = collections.deque()
        elif name == "_finished":
            value = LeanEvent()
            value.set()
        else:
            raise AttributeError(name)
        setattr(self, name, value)
        return value

    def qsize(self) -> int:
        queue = self.__dict__.get("_queue")
        return 0 if queue is None else len(queue)

    def empty(self) -> bool:
        return self.qsize() == 0

    def _get(self) -> _T:
        queue = self._queue
        item: _T = queue.popleft()
        if not queue:
            # Made again by the next put: most queues hold an item now and then.
            del self._queue
        return item

    def wake_on_put(self, waiter: asyncio.Future[None]) -> None:
        """Have the next put set `waiter`'s result, as it wakes a `get` waiting:
        one future waits on several queues at once (bridges.mqtt.loop), where
        a `get` would need a task per queue."""
        self._getters.append(waiter)

    def forget(self, waiter: asyncio.Future[None]) -> None:
        """Undo `wake_on_put` (whether or not a put has woken `waiter`)."""
        getters = self.__dict__.get("_getters")
        if getters is not None and waiter in getters:
            getters.remove(waiter)


class LeanEvent(asyncio.Event):
    """An `asyncio.Event` whose waiters are kept in a list made when first waited on."""

    def __init__(self) -> None:
        # Not asyncio.Event.__init__, which makes the deque at once.
        self._value = False

    def __getattr__(self, name: str) -> Any:
        if name != "_waiters":
            raise AttributeError(name)
        waiters = _Waiters()
        # The same as a deque for what asyncio does with it (append, remove, iterate).
        self._waiters = waiters  # type: ignore[assignment]
        return waiters


def lean_drain_waiters(writer: asyncio.StreamWriter) -> None:
    """Keep the waiters of `writer.drain()` in a list, not a deque: asyncio's
    stream protocol makes an empty deque of them per connection (3.11's
    `FlowControlMixin`), and a list does what it does with them (append,
    remove, iterate). Left as it is where asyncio keeps them otherwise."""
    protocol = getattr(writer, "_protocol", None)
    waiters = getattr(protocol, "_drain_waiters", None)
    if isinstance(waiters, collections.deque) and not waiters:
        protocol._drain_waiters = _Waiters()  # type: ignore[union-attr]
