"""The shared codec plumbing: the receive buffer, NEED_DATA, and the module graph."""

from __future__ import annotations

from datetime import UTC, datetime

import grimp
import pytest

import hub.protocol
from hub.envelope import Kind, envelope_id
from hub.errors import LocalProtocolError
from hub.protocol.buffer import ReceiveBuffer
from hub.protocol.events import NEED_DATA, Hello, NeedData, Role, Telemetry
from hub.protocol.lines import LinesCodec
from hub.protocol.native import NativeCodec
from hub.uplink import EVENT_KINDS, envelope_from_event


def test_need_data_is_public_and_one_instance() -> None:
    assert hub.protocol.NEED_DATA is NEED_DATA
    assert hub.protocol.NeedData is NeedData
    assert NeedData() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert NativeCodec(Role.HUB).next_event() is NEED_DATA


@pytest.mark.parametrize("codec", [NativeCodec, LinesCodec])
def test_both_codecs_share_the_receive_buffer(codec: type[ReceiveBuffer]) -> None:
    assert issubclass(codec, ReceiveBuffer)
    assert codec.receive_data is ReceiveBuffer.receive_data
    assert codec.next_event is ReceiveBuffer.next_event


def test_the_buffer_drops_consumed_bytes_only_when_all_or_many_are_consumed() -> None:
    device, hub_codec = LinesCodec(Role.DEVICE), LinesCodec(Role.HUB)
    hub_codec.receive_data(device.send(Hello("d", "c")))
    hub_codec.next_event()
    line = device.send(Telemetry(1, {"a": 1}))
    hub_codec.receive_data(line + line[:5])
    assert isinstance(hub_codec.next_event(), Telemetry)
    assert hub_codec.next_event() is NEED_DATA
    # A line fed after a partial one is found whole, across the compaction.
    hub_codec.receive_data(line[5:])
    assert hub_codec.next_event() == Telemetry(1, {"a": 1})


@pytest.mark.parametrize("codec", [NativeCodec, LinesCodec])
def test_a_frame_split_across_a_compaction_comes_out_whole(codec: type[NativeCodec]) -> None:
    device, hub_codec = codec(Role.DEVICE), codec(Role.HUB)
    hub_codec.receive_data(device.send(Hello("d", "c")))
    hub_codec.next_event()
    frames = [device.send(Telemetry(seq, {"n": seq})) for seq in range(1, 4001)]
    burst = b"".join(frames[:-1])
    assert len(burst) > 64 * 1024  # past the point where consumed bytes are dropped
    hub_codec.receive_data(burst + frames[-1][:7])
    seqs = []
    while (event := hub_codec.next_event()) is not NEED_DATA:
        assert isinstance(event, Telemetry)
        seqs.append(event.seq)
    hub_codec.receive_data(frames[-1][7:])
    assert hub_codec.next_event() == Telemetry(4000, {"n": 4000})
    assert seqs == list(range(1, 4000))


def test_data_after_end_of_stream_is_the_callers_bug() -> None:
    codec = NativeCodec(Role.HUB)
    codec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        codec.receive_data(b"x")


def test_no_import_circle_is_left_in_hub_protocol() -> None:
    graph = grimp.build_graph("hub")
    modules = sorted(m for m in graph.modules if m.startswith("hub.protocol"))
    circles = [
        (a, b)
        for i, a in enumerate(modules)
        for b in modules[i + 1 :]
        if graph.chain_exists(a, b) and graph.chain_exists(b, a)
    ]
    assert circles == []


def test_envelope_from_event_is_what_the_tcp_bridge_built() -> None:
    event = Telemetry(7, {"t": 1}, 1_700_000_000_000)
    envelope = envelope_from_event(event, EVENT_KINDS[Telemetry], "dev-1", 3, "tcp", "native")
    assert envelope.id == envelope_id("dev-1", 7, 3)
    assert envelope.kind is Kind.TELEMETRY
    assert envelope.seq == 7
    assert envelope.device_time == datetime.fromtimestamp(1_700_000_000, UTC)
    assert (envelope.transport, envelope.protocol) == ("tcp", "native")
    undated = envelope_from_event(Telemetry(8, {}), Kind.TELEMETRY, "dev-1", 3, "tcp", "native")
    assert undated.device_time is None
