"""Lean stand-ins for amqtt's per-session objects (bridges.mqtt.state): same behaviour."""

from __future__ import annotations

import asyncio

import pytest
from amqtt.session import Session
from transitions import MachineError

from bridges.mqtt.acks import AckSequencer
from bridges.mqtt.lean import LeanEvent, LeanQueue, lean_drain_waiters
from bridges.mqtt.state import LeanSession, SessionStates


def test_a_lean_queue_behaves_as_an_asyncio_queue() -> None:
    async def scenario() -> list[int]:
        queue: LeanQueue[int] = LeanQueue()
        assert queue.empty() and queue.qsize() == 0
        assert "_queue" not in queue.__dict__  # nothing made while unused
        got = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(1)
        queue.put_nowait(2)
        await queue.put(3)
        first = await got
        assert queue.qsize() == 2 and not queue.empty()
        rest = [queue.get_nowait(), queue.get_nowait()]
        with pytest.raises(asyncio.QueueEmpty):
            queue.get_nowait()
        for _ in range(3):
            queue.task_done()
        await asyncio.wait_for(queue.join(), 1)
        return [first, *rest]

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_a_lean_queue_drops_its_deque_once_emptied() -> None:
    queue: LeanQueue[int] = LeanQueue()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert queue.get_nowait() == 1
    assert "_queue" in queue.__dict__  # one item left
    assert queue.get_nowait() == 2
    assert "_queue" not in queue.__dict__ and queue.empty()
    queue.put_nowait(3)  # made again
    assert queue.get_nowait() == 3


def test_one_future_waits_on_several_lean_queues() -> None:
    async def scenario() -> tuple[bool, bool, int]:
        first: LeanQueue[int] = LeanQueue()
        second: LeanQueue[int] = LeanQueue()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first.wake_on_put(waiter)
        second.wake_on_put(waiter)
        await asyncio.sleep(0)
        before = waiter.done()
        second.put_nowait(7)
        first.forget(waiter)
        second.forget(waiter)  # woken already: nothing to undo
        first.put_nowait(8)  # forgotten: wakes nobody, and fails nothing
        return before, waiter.done(), second.get_nowait()

    assert asyncio.run(scenario()) == (False, True, 7)


def test_lean_drain_waiters_keep_a_stream_writing() -> None:
    async def scenario() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(3))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lean_drain_waiters(writer)
        assert isinstance(writer._protocol._drain_waiters, list)  # type: ignore[attr-defined]
        writer.write(b"abc")
        await writer.drain()
        data = await reader.readexactly(3)
        writer.close()
        server.close()
        await server.wait_closed()
        return data

    assert asyncio.run(scenario()) == b"abc"


def test_a_puback_queue_is_made_on_first_use() -> None:
    acks = AckSequencer(
        write=lambda _data: None, drain=asyncio.sleep, judge=lambda _f: True, max_inflight=4
    )
    with pytest.raises(AttributeError):
        acks.__getattribute__("_queue")  # not made yet
    assert acks.pending == 0  # made now


def test_a_bounded_lean_queue_makes_put_wait() -> None:
    async def scenario() -> bool:
        queue: LeanQueue[int] = LeanQueue(maxsize=1)
        queue.put_nowait(1)
        assert queue.full()
        blocked = asyncio.create_task(queue.put(2))
        await asyncio.sleep(0)
        waited = not blocked.done()
        assert queue.get_nowait() == 1
        await blocked
        return waited and queue.get_nowait() == 2

    assert asyncio.run(scenario())


def test_a_lean_event_behaves_as_an_asyncio_event() -> None:
    async def scenario() -> bool:
        event = LeanEvent()
        assert not event.is_set()
        assert "_waiters" not in event.__dict__
        waiter = asyncio.create_task(event.wait())
        await asyncio.sleep(0)
        event.set()
        assert await asyncio.wait_for(waiter, 1)
        event.clear()
        return not event.is_set()

    assert asyncio.run(scenario())


def test_session_states_follow_amqtts_machine() -> None:
    stock, lean = Session(), Session()
    lean.transitions = SessionStates(lean)
    for trigger in ("disconnect", "connect", "disconnect", "disconnect", "connect"):
        getattr(stock.transitions, trigger)()
        getattr(lean.transitions, trigger)()
        assert lean.transitions.state == stock.transitions.state
        assert lean.transitions.is_connected() == stock.transitions.is_connected()
        assert (lean.last_connect_time is None) == (stock.last_connect_time is None)
        assert (lean.last_disconnect_time is None) == (stock.last_disconnect_time is None)
    with pytest.raises(MachineError):
        stock.transitions.connect()
    with pytest.raises(MachineError):
        lean.transitions.connect()  # connected already


def test_the_broker_makes_lean_sessions() -> None:
    from amqtt.mqtt.protocol import broker_handler

    import bridges.mqtt.sessions  # noqa: F401  (installs LeanSession)

    assert broker_handler.Session is LeanSession
    session = LeanSession()
    assert isinstance(session.transitions, SessionStates)
    assert session.transitions.is_new()
    assert isinstance(session.retained_messages, LeanQueue)
    assert isinstance(session.delivered_message_queue, LeanQueue)
    session.transitions.connect()
    assert session.last_connect_time is not None
