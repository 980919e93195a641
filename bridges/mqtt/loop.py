"""Each connection's message loop: its SUBSCRIBEs, UNSUBSCRIBEs, PUBLISHes and end, in its own task.

Layer: bridges; imports `bridges.mqtt.lean` and amqtt.

Stock amqtt 0.12.1 (`Broker._client_message_loop`) gives every connection
four more tasks, each waiting on one thing (the end of the connection, the
next SUBSCRIBE, UNSUBSCRIBE or PUBLISH), and an `asyncio.wait` over the four
between packets: about 6 KB per connection held while it is idle, a fifth of
what a connected device cost the hub (docs/mqtt.md, "Connection scale").
`MessageLoopBroker` runs the same loop in the connection's own task, which
waits on one future between packets: the next put to any of the three
queues (`LeanQueue.wake_on_put`) or the end of the connection sets it. Each
round handles what is ready in stock amqtt's order (the end of the
connection first, then a SUBSCRIBE, an UNSUBSCRIBE, a PUBLISH) with the
broker's own handlers, and ends as stock amqtt's does: at the end of the
connection, when a PUBLISH may not be delivered (an invalid topic), or when
the task is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridges.mqtt.lean import LeanQueue


class _Ready:
    """An item taken from a queue, as the broker's handlers read it: like the
    done future of the waiter task stock amqtt would have had."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class MessageLoopBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker with one task per connection's message loop; see the module docstring."""

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        subscriptions = handler._pending_subscriptions
        unsubscriptions = handler._pending_unsubscriptions
        deliveries = client_session.delivered_message_queue
        ended: asyncio.Future[Any] | None = handler._disconnect_waiter
        queues = (subscriptions, unsubscriptions, deliveries)
        if ended is None or not all(isinstance(q, LeanQueue) for q in queues):
            # Not a lean session and handler (nor started): amqtt's own loop.
            await super()._client_message_loop(client_session, handler)
            return
        loop = asyncio.get_running_loop()
        try:
            while True:
                if ended.done():
                    await self._handle_disconnect(client_session, handler, ended)
                    return
                worked = False
                if not subscriptions.empty():
                    worked = True
                    ready = _Ready(subscriptions.get_nowait())
                    await self._handle_subscription(client_session, handler, ready)
                if not unsubscriptions.empty():
                    worked = True
                    ready = _Ready(unsubscriptions.get_nowait())
                    await self._handle_unsubscription(client_session, handler, ready)
                if not deliveries.empty():
                    worked = True
                    ready = _Ready(deliveries.get_nowait())
                    if not await self._handle_message_delivery(client_session, handler, ready):
                        return
                if worked:
                    # Stock amqtt's `asyncio.wait` gave the loop a turn between
                    # rounds: a client sending fast does not hold it.
                    await asyncio.sleep(0)
                    continue
                await self._next_event(loop, queues, ended)
        except asyncio.CancelledError:
            return  # as stock amqtt: a cancelled loop ends, the session's end follows

    @staticmethod
    async def _next_event(
        loop: asyncio.AbstractEventLoop,
        queues: tuple[LeanQueue[Any], ...],
        ended: asyncio.Future[Any],
    ) -> None:
        """Wait until one of `queues` is put to or the connection has ended."""
        waiter: asyncio.Future[None] = loop.create_future()
        for queue in queues:
            queue.wake_on_put(waiter)

        def on_end(_ended: asyncio.Future[Any]) -> None:
            _wake(waiter)

        ended.add_done_callback(on_end)
        try:
            await waiter
        finally:
            ended.remove_done_callback(on_end)
            for queue in queues:
                queue.forget(waiter)
