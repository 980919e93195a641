"""Unit tests of the simulator's byte-level faults and of the Outbox that applies them."""

from __future__ import annotations

import asyncio
import random

import pytest
from click.testing import CliRunner

from firmware_sim.cli import main
from firmware_sim.faults import (
    Delay,
    DelayWrites,
    DropEvery,
    FlipByte,
    SplitRandomly,
    chain,
    parse_fault,
)
from firmware_sim.outbox import Outbox

# ---------------------------------------------------------------------------
# The ready faults
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_split_keeps_every_byte_in_order_in_non_empty_pieces(seed: int) -> None:
    data = random.Random(seed).randbytes(random.Random(seed).randint(1, 300))
    split = SplitRandomly(5, seed=seed)
    pieces = split(data)
    assert all(isinstance(p, bytes) and p for p in pieces)
    assert b"".join(p for p in pieces if isinstance(p, bytes)) == data
    assert 1 <= len(pieces) <= 5


def test_split_does_split_and_is_reproducible_with_a_seed() -> None:
    data = bytes(range(200))
    first, second = SplitRandomly(8, seed=1), SplitRandomly(8, seed=1)
    assert [first(data) for _ in range(10)] == [second(data) for _ in range(10)]
    split = SplitRandomly(8, seed=1)
    assert max(len(split(data)) for _ in range(50)) > 1


def test_flip_inverts_exactly_one_byte_of_every_nth_write() -> None:
    flip = FlipByte(every=3, seed=0)
    data = bytes(range(64))
    outputs = [flip(data) for _ in range(7)]
    for n, (out,) in enumerate(outputs):
        assert isinstance(out, bytes) and len(out) == len(data)
        changed = [i for i in range(len(data)) if out[i] != data[i]]
        if n % 3 == 0:  # writes 1, 4 and 7
            assert len(changed) == 1
            assert out[changed[0]] == data[changed[0]] ^ 0xFF
        else:
            assert changed == []


def test_drop_every_nth_write() -> None:
    drop = DropEvery(3)
    kept = [drop(bytes([n])) for n in range(1, 10)]
    assert [bool(k) for k in kept] == [True, True, False] * 3
    assert kept[0] == [b"\x01"]


def test_delay_comes_before_the_write() -> None:
    assert DelayWrites(0.25)(b"abc") == [Delay(0.25), b"abc"]
    with pytest.raises(ValueError):
        DelayWrites(-1)


def test_chain_applies_faults_in_turn_and_passes_delays_along() -> None:
    fault = chain(DelayWrites(0.1), SplitRandomly(4, seed=2))
    out = fault(bytes(range(50)))
    assert out[0] == Delay(0.1)
    assert b"".join(p for p in out[1:] if isinstance(p, bytes)) == bytes(range(50))
    assert chain(DropEvery(1), SplitRandomly(4))(b"gone") == []


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("split", SplitRandomly),
        ("split:3", SplitRandomly),
        ("flip", FlipByte),
        ("flip:10", FlipByte),
        ("drop:5", DropEvery),
        ("delay:0.05", DelayWrites),
    ],
)
def test_parse_fault_builds_the_named_fault(spec: str, kind: type) -> None:
    assert isinstance(parse_fault(spec), kind)


@pytest.mark.parametrize("spec", ["", "shuffle", "drop", "drop:x", "delay", "split:0", "delay:-1"])
def test_parse_fault_refuses_what_it_does_not_know(spec: str) -> None:
    with pytest.raises(ValueError, match="fault"):
        parse_fault(spec)


# ---------------------------------------------------------------------------
# The Outbox
# ---------------------------------------------------------------------------


class _Wire:
    """A write function that takes at most `room` bytes per call and records the time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, room: int | None = None) -> None:
        self.loop = loop
        self.room = room
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> int | None:
        if self.room is not None and len(data) > self.room:
            data = data[: self.room]
        self.writes.append((self.loop.time(), data))
        return None if self.room is None else len(data)

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.writes)


def test_outbox_writes_pieces_at_once_when_there_is_no_delay() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        wire = _Wire(loop)
        outbox = Outbox(wire.write, SplitRandomly(4, seed=5), loop)
        outbox.send(b"hello world")
        assert wire.data == b"hello world" and outbox.pending == 0

    asyncio.run(body())


def test_outbox_delays_keep_the_order_and_are_latency_not_a_slower_link() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        wire = _Wire(loop)
        outbox = Outbox(wire.write, DelayWrites(0.2), loop)
        started = loop.time()
        for n in range(5):
            outbox.send(bytes([n]))
        assert wire.writes == [] and outbox.pending == 5
        await asyncio.sleep(0.35)
        assert wire.data == bytes(range(5))
        # Five writes delayed by 0.2 s each arrive after about 0.2 s, not 1 s.
        assert all(at - started >= 0.19 for at, _ in wire.writes)

    asyncio.run(body())


def test_outbox_retries_what_a_full_socket_did_not_take() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        wire = _Wire(loop, room=3)
        outbox = Outbox(wire.write, lambda data: [data], loop)
        outbox.send(b"0123456789")
        outbox.send(b"ab")
        await asyncio.sleep(0.1)
        assert wire.data == b"0123456789ab"
        assert outbox.pending == 0

    asyncio.run(body())


def test_outbox_close_forgets_what_was_held_back() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        wire = _Wire(loop)
        outbox = Outbox(wire.write, DelayWrites(0.05), loop)
        outbox.send(b"late")
        outbox.close()
        outbox.send(b"after close")
        await asyncio.sleep(0.1)
        assert wire.writes == []

    asyncio.run(body())


# ---------------------------------------------------------------------------
# The CLI option
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "mqtt"])
def test_cli_documents_the_fault_option(transport: str) -> None:
    result = CliRunner().invoke(main, [transport, "--help"])
    assert result.exit_code == 0
    assert "--fault" in result.output and "split" in result.output


def test_cli_refuses_an_unknown_fault() -> None:
    result = CliRunner().invoke(
        main, ["tcp", "--messages", "1", "--credential", "s", "--fault", "shuffle"]
    )
    assert result.exit_code == 2
    assert "unknown fault" in result.output
