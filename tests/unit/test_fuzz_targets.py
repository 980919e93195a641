"""The fuzz harnesses replay their seeds and the kept corpus, and have teeth.

Every input a fuzz run kept (`fuzz/corpus/<target>/`) runs through the same
harness here on every test run, so a codec change that breaks one of them
fails at once, without atheris. See docs/fuzzing.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from fuzz.__main__ import TARGETS
from fuzz.codec_harness import Finding, codec_target
from hub.errors import RemoteProtocolError
from hub.protocol.events import NEED_DATA, Ack, Role
from hub.protocol.native import NativeCodec

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"


def inputs(target: str) -> list[bytes]:
    module: Any = importlib.import_module(f"fuzz.{target}")
    kept = sorted((CORPUS / target).glob("*")) if (CORPUS / target).is_dir() else []
    return [*module.seeds(), *(path.read_bytes() for path in kept)]


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_and_kept_inputs_pass(target: str) -> None:
    module: Any = importlib.import_module(f"fuzz.{target}")
    found = inputs(target)
    assert len(found) >= 10
    for data in found:
        module.one_input(data)


@pytest.mark.parametrize("target", ["native", "lines"])
def test_seeds_reach_events_in_both_roles(target: str) -> None:
    # Seeds that only ever failed would fuzz nothing but the first byte.
    from fuzz.codec_harness import receive_all, split

    module: Any = importlib.import_module(f"fuzz.{target}")
    clean = {Role.HUB: 0, Role.DEVICE: 0}
    for data in module.seeds():
        role, chunks = split(data)
        events, error = receive_all(module.factory(role), chunks)
        if error is None and len(events) > 1:
            clean[role] += 1
    assert clean[Role.HUB] > 5 and clean[Role.DEVICE] > 5


class _LeakyCodec(NativeCodec):
    """A codec with the kind of bug the harness is for: a stray exception."""

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, Ack) and event.seq == 1:
            raise KeyError("a bug")
        return event


class _SplitSensitiveCodec(NativeCodec):
    """A codec that answers differently when bytes come one at a time."""

    def receive_data(self, data: bytes) -> None:
        # Loses track of the magic when its first byte arrives alone.
        super().receive_data(b"X" if data == b"H" else data)


def test_the_harness_reports_a_stray_exception() -> None:
    one_input = codec_target(lambda role: _LeakyCodec(role))
    ack = bytes.fromhex("4842010500000000000000000164020939")  # ACK seq 1, to a device
    with pytest.raises(KeyError):
        one_input(b"\x01" + ack)


def test_the_harness_reports_a_codec_that_depends_on_the_split() -> None:
    one_input = codec_target(lambda role: _SplitSensitiveCodec(role))
    ping = bytes.fromhex("48420107000000000000000004109d2d8b")
    with pytest.raises(Finding, match="split and whole"):
        one_input(bytes([1 | 1 << 1]) + ping)  # to a device, one byte at a time


def test_a_mqtt_reader_that_hangs_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import fuzz.mqtt as target

    async def stuck(self: Any, n: int = -1) -> bytes:
        await asyncio.sleep(3600)
        return b""

    monkeypatch.setattr(target, "HANG_S", 0.2)
    monkeypatch.setattr(target.PacketReader, "read", stuck)
    with pytest.raises(Finding, match="waited more than"):
        target.one_input(b"\x01\x10\x00")


def test_need_data_is_not_an_event() -> None:
    assert NativeCodec(Role.HUB).next_event() is NEED_DATA


@pytest.mark.parametrize("number", [b"1e400", b"-1e400"])
def test_codecs_refuse_numbers_json_cannot_carry(number: bytes) -> None:
    # 1e400 is valid JSON text, but Python reads it as infinity, which no JSON
    # encoder may write back: the codec should refuse it as BAD_PAYLOAD.
    from hub.protocol.rules import decode_json_object

    with pytest.raises(RemoteProtocolError):
        decode_json_object(b'{"t":' + number + b"}", "TELEMETRY", 1)
