"""The acknowledgement sequencer (bridges.mqtt.acks): order, one write per batch, backpressure."""

from __future__ import annotations

import asyncio

from bridges.mqtt.acks import DRAIN_BYTES, AckSequencer
from hub.errors import DispatchError


def puback(*packet_ids: int) -> bytes:
    return b"".join(b"\x40\x02" + p.to_bytes(2, "big") for p in packet_ids)


class Reader:
    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


class Connection:
    def __init__(self, max_inflight: int = 100) -> None:
        self.writes: list[bytes] = []
        self.acked = 0
        self.reader = Reader()
        self.acks = AckSequencer(
            write=self.writes.append,
            drain=self._drain,
            judge=lambda f: not f.cancelled() and f.exception() is None,
            max_inflight=max_inflight,
            on_acked=self._count,
        )
        self.acks.attach(self.reader)

    async def _drain(self) -> None:
        await asyncio.sleep(0)

    def _count(self, n: int) -> None:
        self.acked += n


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_pubacks_of_one_batch_leave_in_one_write_in_order() -> None:
    async def main() -> None:
        conn = Connection()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        for packet_id, future in zip((7, 8, 9), futures, strict=True):
            conn.acks.add_fast(packet_id, future)
        # Resolved out of order in one turn, as a batch: one write, in read order.
        for future in reversed(futures):
            future.set_result(None)
        await settle()
        assert conn.writes == [puback(7, 8, 9)]
        assert conn.acked == 3
        assert conn.acks.pending == 0

    asyncio.run(main())


def test_a_later_message_waits_for_an_earlier_one() -> None:
    async def main() -> None:
        conn = Connection()
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        conn.acks.add_fast(1, first)
        conn.acks.add_fast(2, second)
        second.set_result(None)
        await settle()
        assert conn.writes == []
        first.set_result(None)
        await settle()
        assert conn.writes == [puback(1, 2)]

    asyncio.run(main())


def test_a_slow_entry_keeps_its_place_between_fast_ones() -> None:
    async def main() -> None:
        conn = Connection()
        loop = asyncio.get_running_loop()
        before, after = loop.create_future(), loop.create_future()
        conn.acks.add_fast(1, before)
        turn = conn.acks.add_slow()
        conn.acks.add_fast(3, after)
        written_by_slow: list[list[bytes]] = []

        async def slow_task() -> None:
            await turn.wait()
            written_by_slow.append(list(conn.writes))  # what was written before its turn
            conn.writes.append(puback(2))  # amqtt's own PUBACK
            conn.acks.finish(turn)

        task = asyncio.ensure_future(slow_task())
        after.set_result(None)
        await settle()
        assert conn.writes == [] and not task.done()
        before.set_result(None)
        await settle()
        await task
        assert written_by_slow == [[puback(1)]]
        assert conn.writes == [puback(1), puback(2), puback(3)]

    asyncio.run(main())


def test_a_message_that_did_not_become_durable_gets_no_puback_and_holds_nothing() -> None:
    async def main() -> None:
        conn = Connection()
        loop = asyncio.get_running_loop()
        failed, fine = loop.create_future(), loop.create_future()
        conn.acks.add_fast(1, failed)
        conn.acks.add_fast(2, fine)
        conn.acks.add_fast(3, None)  # an invalid payload: acknowledged in its turn
        failed.set_exception(DispatchError("spool full"))
        fine.set_result(None)
        await settle()
        assert conn.writes == [puback(2, 3)]
        assert conn.acked == 1  # only the durable one counts as acknowledged

    asyncio.run(main())


def test_the_reader_pauses_at_max_inflight_and_resumes_below() -> None:
    async def main() -> None:
        conn = Connection(max_inflight=2)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(2)]
        conn.acks.add_fast(1, futures[0])
        assert not conn.reader.paused
        conn.acks.add_fast(2, futures[1])
        assert conn.reader.paused
        futures[0].set_result(None)
        await settle()
        assert not conn.reader.paused

    asyncio.run(main())


def test_nothing_is_written_after_close_and_slow_turns_are_released() -> None:
    async def main() -> None:
        conn = Connection()
        loop = asyncio.get_running_loop()
        pending = loop.create_future()
        conn.acks.add_fast(1, pending)
        turn = conn.acks.add_slow()
        conn.acks.close()
        await asyncio.wait_for(turn.wait(), 1)
        pending.set_result(None)
        await settle()
        assert conn.writes == []
        assert not conn.reader.paused

    asyncio.run(main())


def test_the_reader_pauses_while_unread_pubacks_drain() -> None:
    async def main() -> None:
        drained = asyncio.Event()
        writes: list[bytes] = []
        reader = Reader()

        async def drain() -> None:
            await drained.wait()  # the client reads nothing until told

        acks = AckSequencer(
            write=writes.append,
            drain=drain,
            judge=lambda f: True,
            max_inflight=1_000_000,
        )
        acks.attach(reader)
        # 64 KiB of PUBACKs (4 bytes each), none read by the client.
        for packet_id in range(DRAIN_BYTES // 4):
            acks.add_fast(packet_id % 65535 + 1, None)
        await settle()
        assert sum(map(len, writes)) == DRAIN_BYTES
        assert reader.paused  # not read further while they wait in the send buffer
        drained.set()
        await settle()
        assert not reader.paused

    asyncio.run(main())
