"""The handshake gate (bridges.mqtt.handshakes): bounded, the newest first, no refusal."""

from __future__ import annotations

import asyncio

import pytest

from bridges.mqtt.handshakes import HandshakeGate, leave


def test_at_most_the_limit_are_in_their_handshake_and_the_newest_waiting_goes_first() -> None:
    async def scenario() -> tuple[list[tuple[int, bool]], int]:
        gate = HandshakeGate(2)
        order: list[tuple[int, bool]] = []
        peak = 0
        release = asyncio.Event()

        async def connection(n: int) -> None:
            nonlocal peak
            async with gate.enter() as waited:
                order.append((n, waited))
                peak = max(peak, gate.in_progress)
                await release.wait()

        tasks = [asyncio.create_task(connection(n)) for n in range(6)]
        await asyncio.sleep(0.01)
        assert order == [(0, False), (1, False)]  # the others wait, none is turned away
        assert gate.waiting == 4
        release.set()
        await asyncio.gather(*tasks)
        return order, peak

    order, peak = asyncio.run(scenario())
    assert [n for n, _ in order] == [0, 1, 5, 4, 3, 2]
    assert [waited for _, waited in order] == [False, False, True, True, True, True]
    assert peak == 2


def test_leave_frees_the_place_before_the_connection_ends_and_only_once() -> None:
    async def scenario() -> list[str]:
        gate = HandshakeGate(1)
        seen: list[str] = []
        connected = asyncio.Event()

        async def first() -> None:
            async with gate.enter():
                leave()  # CONNACK written: the connection lives on outside the gate
                leave()
                seen.append("first acknowledged")
                await connected.wait()
            seen.append("first closed")

        async def second() -> None:
            async with gate.enter():
                seen.append("second in")
                assert gate.in_progress == 1
                connected.set()

        await asyncio.gather(first(), second())
        assert gate.in_progress == 0
        return seen

    assert asyncio.run(scenario()) == ["first acknowledged", "second in", "first closed"]


def test_a_waiter_cancelled_takes_no_place() -> None:
    async def scenario() -> int:
        gate = HandshakeGate(1)
        hold = asyncio.Event()

        async def holder() -> None:
            async with gate.enter():
                await hold.wait()

        async def waiter() -> None:
            async with gate.enter():
                pass

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        gone = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        gone.cancel()
        hold.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert gate.waiting == 0
        async with gate.enter():
            return gate.in_progress

    assert asyncio.run(scenario()) == 1


def test_leave_outside_a_gate_does_nothing() -> None:
    leave()
    with pytest.raises(ValueError):
        HandshakeGate(0)
