"""The dispatcher's room (bridges.backpressure): full at the bound, open again at half."""

from __future__ import annotations

import asyncio

import pytest

from bridges.backpressure import Room


def test_fills_at_the_bound_and_opens_again_only_at_half() -> None:
    filled: list[int] = []
    room = Room(10, on_full=lambda: filled.append(room.pending))
    room.taken(9)
    assert not room.full
    room.taken()
    assert room.full and filled == [10]
    room.released(4)  # 6 left: above half
    assert room.full
    room.released(1)  # 5: half
    assert not room.full
    room.taken(5)
    assert room.full and filled == [10, 10]


def test_resumes_each_waiting_connection_once_when_it_opens() -> None:
    room = Room(4)
    calls: list[str] = []
    room.call_when_open("a", lambda: calls.append("open at once"))
    assert calls == ["open at once"]
    calls.clear()
    room.taken(4)
    room.call_when_open("a", lambda: calls.append("a"))
    room.call_when_open("a", lambda: calls.append("a again"))  # one per key: the last
    room.call_when_open("b", lambda: calls.append("b"))
    room.call_when_open("c", lambda: calls.append("c"))
    room.forget("c")  # closed meanwhile
    room.released(1)
    assert calls == []
    room.released(1)
    assert sorted(calls) == ["a again", "b"]
    room.taken(2)
    room.released(4)
    assert sorted(calls) == ["a again", "b"]  # waiters are called once, then forgotten


def test_readers_wait_while_full_and_go_on_when_it_opens() -> None:
    async def scenario() -> list[str]:
        room = Room(2)
        order: list[str] = []
        await room.wait()  # open: returns at once
        room.taken(2)

        async def reader(name: str) -> None:
            await room.wait()
            order.append(name)

        readers = [asyncio.ensure_future(reader(n)) for n in ("x", "y")]
        await asyncio.sleep(0.01)
        order.append("still full")
        room.released(1)
        await asyncio.gather(*readers)
        room.taken(1)
        assert room.full  # it fills again: the next wait waits again
        late = asyncio.ensure_future(reader("late"))
        await asyncio.sleep(0.01)
        assert not late.done()
        room.released(2)
        await late
        return order

    assert asyncio.run(scenario()) == ["still full", "x", "y", "late"]


def test_released_never_goes_below_zero_and_the_bound_must_be_positive() -> None:
    room = Room(3)
    room.released(5)
    assert room.pending == 0
    with pytest.raises(ValueError):
        Room(0)
