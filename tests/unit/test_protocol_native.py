"""Unit tests for the native binary protocol codec (docs/protocol.md) and codec lookup."""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from hub.protocol.base import Codec
from hub.protocol.discovery import available_codecs, load_codec
from hub.protocol.events import (
    NEED_DATA,
    Ack,
    Command,
    CommandResult,
    ConnectionClosed,
    DeviceEvent,
    Event,
    Hello,
    Nak,
    NakReason,
    NeedData,
    Ping,
    Role,
    StateReport,
    Telemetry,
)
from hub.protocol.lines import LinesCodec
from hub.protocol.native import HEADER, NativeCodec
from tests.unit.protocol_vectors import (
    HELLO,
    NATIVE_VECTORS,
    Vector,
    device_events,
    hellos,
    hexdump,
    hub_events,
    random_chunks,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
HELLO_WIRE = NATIVE_VECTORS[0].wire


# -- helpers -----------------------------------------------------------------


def build_frame(
    ftype: int,
    seq: int,
    payload: bytes = b"",
    *,
    magic: bytes = b"HB",
    version: int = 1,
    flags: int = 0,
    length: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A frame laid out by hand from the specification, any field overridable."""
    body = struct.pack(
        ">2sBBBII", magic, version, ftype, flags, len(payload) if length is None else length, seq
    )
    body += payload
    return body + struct.pack(">I", zlib.crc32(body) if crc is None else crc)


def data_payload(obj: Any, ms: int = 0) -> bytes:
    return struct.pack(">Q", ms) + json.dumps(obj).encode()


def drain(codec: NativeCodec) -> list[Event]:
    events: list[Event] = []
    while True:
        event = codec.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def feed(codec: NativeCodec, chunks: Iterator[bytes] | list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        events += drain(codec)
    return events


def split_whole(data: bytes) -> list[bytes]:
    return [data]


def split_bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_random(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


SPLITS: dict[str, Callable[[bytes], list[bytes]]] = {
    "whole": split_whole,
    "bytewise": split_bytewise,
    "random1": lambda d: split_random(d, 1),
    "random2": lambda d: split_random(d, 2),
    "random3": lambda d: split_random(d, 3),
}


def hub_ready(**kwargs: int) -> NativeCodec:
    """A hub codec that has received the HELLO."""
    codec = NativeCodec(Role.HUB, **kwargs)
    codec.receive_data(HELLO_WIRE)
    assert codec.next_event() == HELLO
    return codec


def device_ready(**kwargs: int) -> NativeCodec:
    """A device codec that has sent its HELLO."""
    codec = NativeCodec(Role.DEVICE, **kwargs)
    assert codec.send(HELLO) == HELLO_WIRE
    return codec


def ready(role: Role) -> NativeCodec:
    return hub_ready() if role is Role.HUB else device_ready()


def expect_remote(codec: NativeCodec, data: bytes, code: NakReason) -> RemoteProtocolError:
    codec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(codec)
    assert info.value.code == code, info.value
    return info.value


def vector_cases() -> Iterator[Any]:
    for vector in NATIVE_VECTORS:
        for role in vector.senders:
            yield pytest.param(vector, role, id=f"{vector.name}-from-{role.value}")


def receive_cases() -> Iterator[Any]:
    for vector in NATIVE_VECTORS:
        for role in vector.receivers:
            for split in SPLITS:
                yield pytest.param(vector, role, split, id=f"{vector.name}-to-{role.value}-{split}")


# -- golden vectors ----------------------------------------------------------


def test_crc_is_crc32_iso_hdlc() -> None:
    # docs/protocol.md, "CRC": the standard check value of CRC-32/ISO-HDLC.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert HEADER.size == 13


@pytest.mark.parametrize(("vector", "role"), list(vector_cases()))
def test_send_matches_golden_vector(vector: Vector, role: Role) -> None:
    codec = NativeCodec(role) if isinstance(vector.event, Hello) else ready(role)
    assert codec.send(vector.event) == vector.wire


@pytest.mark.parametrize(("vector", "role", "split"), list(receive_cases()))
def test_golden_vector_decodes(vector: Vector, role: Role, split: str) -> None:
    codec = NativeCodec(role) if isinstance(vector.event, Hello) else ready(role)
    assert feed(codec, SPLITS[split](vector.wire)) == [vector.event]
    assert codec.next_event() is NEED_DATA


def test_golden_vectors_are_in_the_document() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for vector in NATIVE_VECTORS:
        assert hexdump(vector.wire) in text, vector.name


@pytest.mark.parametrize("seed", range(5))
def test_stream_of_all_device_frames_in_random_splits(seed: int) -> None:
    device_frames = [v for v in NATIVE_VECTORS[2:] if Role.DEVICE in v.senders]
    stream = HELLO_WIRE + b"".join(v.wire for v in device_frames)
    codec = NativeCodec(Role.HUB)
    events = feed(codec, [*split_random(stream, seed), b""])
    assert events == [HELLO, *(v.event for v in device_frames), ConnectionClosed()]


def test_lenient_fields_are_optional_on_receive() -> None:
    # docs/protocol.md, "COMMAND" and "COMMAND_RESULT": keys with defaults may be omitted.
    device = device_ready()
    device.receive_data(build_frame(0x09, 3, b'{"id":"a","name":"n","extra":1}'))
    assert drain(device) == [Command(3, "a", "n", {})]
    hub = hub_ready()
    hub.receive_data(build_frame(0x0A, 4, b'{"id":"a","ok":false}'))
    assert drain(hub) == [CommandResult(4, "a", False, None, "")]


# -- round trips and garbage (hypothesis) ------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    hello=hellos, events=st.lists(device_events, max_size=8), cuts=st.lists(st.integers(0, 10**6))
)
def test_round_trip_device_to_hub(hello: Hello, events: list[Event], cuts: list[int]) -> None:
    device = NativeCodec(Role.DEVICE)
    stream = device.send(hello) + b"".join(device.send(e) for e in events)
    hub = NativeCodec(Role.HUB)
    assert feed(hub, [*random_chunks(stream, cuts), b""]) == [hello, *events, ConnectionClosed()]


@settings(max_examples=150, deadline=None)
@given(events=st.lists(hub_events, max_size=8), cuts=st.lists(st.integers(0, 10**6)))
def test_round_trip_hub_to_device(events: list[Event], cuts: list[int]) -> None:
    hub = NativeCodec(Role.HUB)
    stream = b"".join(hub.send(e) for e in events)
    device = device_ready()
    assert feed(device, random_chunks(stream, cuts)) == events


def consume_garbage(codec: NativeCodec, chunks: list[bytes]) -> None:
    """Anything but events, NEED_DATA and RemoteProtocolError fails the test."""
    try:
        for chunk in [*chunks, b""]:
            codec.receive_data(chunk)
            drain(codec)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, int) and exc.code in set(NakReason)
        # Sticky: the same error again, and no crash on more data.
        with pytest.raises(RemoteProtocolError) as again:
            codec.next_event()
        assert again.value is exc
        codec.receive_data(b"more")


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """Valid frames, then some bytes flipped, dropped or inserted."""
    device = NativeCodec(Role.DEVICE)
    events = draw(st.lists(device_events, max_size=4))
    data = bytearray(device.send(HELLO) + b"".join(device.send(e) for e in events))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "drop", "insert"]))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "drop":
            del data[at]
        else:
            data.insert(at, draw(st.integers(0, 255)))
    return bytes(data)


garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"HB\x01" + b),
    st.binary(max_size=300).map(lambda b: HELLO_WIRE + b),
    mutated_streams(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=garbage, cuts=st.lists(st.integers(0, 10**6), max_size=5))
def test_garbage_to_hub_yields_only_events_or_remote_errors(data: bytes, cuts: list[int]) -> None:
    consume_garbage(NativeCodec(Role.HUB, max_frame_bytes=256), random_chunks(data, cuts))


@settings(max_examples=150, deadline=None)
@given(data=garbage)
def test_garbage_to_device_yields_only_events_or_remote_errors(data: bytes) -> None:
    consume_garbage(device_ready(), [data])


# -- receive errors ----------------------------------------------------------

HUB_ERRORS = [
    ("bad-magic", build_frame(0x07, 1, magic=b"XB"), NakReason.MALFORMED),
    ("bad-magic-early", b"HE", NakReason.MALFORMED),
    ("bad-magic-first-byte", b"\x00", NakReason.MALFORMED),
    ("version-0", build_frame(0x07, 1, version=0), NakReason.UNSUPPORTED_VERSION),
    ("version-2", build_frame(0x07, 1, version=2), NakReason.UNSUPPORTED_VERSION),
    ("flags", build_frame(0x07, 5, flags=0x80), NakReason.MALFORMED),
    ("unknown-type-0", build_frame(0x00, 5), NakReason.UNKNOWN_TYPE),
    ("unknown-type-0b", build_frame(0x0B, 5), NakReason.UNKNOWN_TYPE),
    ("unknown-type-ff", build_frame(0xFF, 5), NakReason.UNKNOWN_TYPE),
    ("bad-crc", build_frame(0x07, 5, crc=0), NakReason.BAD_CRC),
    ("ping-with-payload", build_frame(0x07, 5, b"x"), NakReason.MALFORMED),
    ("ack-with-payload", build_frame(0x05, 5, b"\x00"), NakReason.MALFORMED),
    ("telemetry-short", build_frame(0x02, 5, b"\x00" * 7), NakReason.MALFORMED),
    ("telemetry-no-json", build_frame(0x02, 5, b"\x00" * 8), NakReason.BAD_PAYLOAD),
    ("telemetry-bad-json", build_frame(0x02, 5, b"\x00" * 8 + b"{"), NakReason.BAD_PAYLOAD),
    ("telemetry-array", build_frame(0x02, 5, data_payload([1, 2])), NakReason.BAD_PAYLOAD),
    ("telemetry-string", build_frame(0x02, 5, data_payload("x")), NakReason.BAD_PAYLOAD),
    ("event-nan", build_frame(0x03, 5, b"\x00" * 8 + b'{"a":NaN}'), NakReason.BAD_PAYLOAD),
    ("state-not-utf8", build_frame(0x04, 5, b"\x00" * 8 + b'{"a":"\xff"}'), NakReason.BAD_PAYLOAD),
    (
        "state-utf16",
        build_frame(0x04, 5, b"\x00" * 8 + "{}".encode("utf-16")),
        NakReason.BAD_PAYLOAD,
    ),
    ("deep-json", build_frame(0x02, 5, b"\x00" * 8 + b"[" * 60000), NakReason.BAD_PAYLOAD),
    ("nak-empty", build_frame(0x06, 5), NakReason.MALFORMED),
    ("nak-reason-0", build_frame(0x06, 5, b"\x00"), NakReason.MALFORMED),
    ("nak-reason-200", build_frame(0x06, 5, b"\xc8oops"), NakReason.MALFORMED),
    ("nak-bad-utf8", build_frame(0x06, 5, b"\x03\xc3"), NakReason.BAD_PAYLOAD),
    ("result-no-id", build_frame(0x0A, 5, b'{"ok":true}'), NakReason.BAD_PAYLOAD),
    ("result-ok-int", build_frame(0x0A, 5, b'{"id":"a","ok":1}'), NakReason.BAD_PAYLOAD),
    (
        "result-error-null",
        build_frame(0x0A, 5, b'{"id":"a","ok":true,"error":null}'),
        NakReason.BAD_PAYLOAD,
    ),
    ("result-array", build_frame(0x0A, 5, b"[]"), NakReason.BAD_PAYLOAD),
    ("second-hello", HELLO_WIRE, NakReason.MALFORMED),
    ("command-to-hub", NATIVE_VECTORS[10].wire, NakReason.MALFORMED),
]


@pytest.mark.parametrize(("data", "code"), [pytest.param(d, c, id=n) for n, d, c in HUB_ERRORS])
def test_hub_refuses(data: bytes, code: NakReason) -> None:
    # A big limit so the deep-JSON frame reaches the JSON parser.
    error = expect_remote(hub_ready(max_frame_bytes=1 << 20), data, code)
    if len(data) >= 13 and data[:3] == b"HB\x01":
        assert error.seq == struct.unpack_from(">I", data, 9)[0]
    else:
        assert error.seq == 0


def hello_frame(boot: bytes, id_len: int, device_id: bytes, cred_len: int, cred: bytes) -> bytes:
    return build_frame(0x01, 0, boot + bytes([id_len]) + device_id + bytes([cred_len]) + cred)


HELLO_ERRORS = [
    ("empty", build_frame(0x01, 0), NakReason.MALFORMED),
    ("truncated-boot-id", build_frame(0x01, 0, b"\x00\x00"), NakReason.MALFORMED),
    ("id-len-0", hello_frame(b"\0" * 4, 0, b"", 0, b""), NakReason.MALFORMED),
    ("id-len-129", hello_frame(b"\0" * 4, 129, b"a" * 129, 0, b""), NakReason.MALFORMED),
    ("id-truncated", build_frame(0x01, 0, b"\0\0\0\0\x05abc"), NakReason.MALFORMED),
    ("no-cred-len", build_frame(0x01, 0, b"\0\0\0\0\x03abc"), NakReason.MALFORMED),
    ("cred-truncated", hello_frame(b"\0" * 4, 3, b"abc", 5, b"pw"), NakReason.MALFORMED),
    ("trailing-bytes", hello_frame(b"\0" * 4, 3, b"abc", 2, b"pwX"), NakReason.MALFORMED),
    ("id-not-utf8", hello_frame(b"\0" * 4, 2, b"\xff\xfe", 2, b"pw"), NakReason.BAD_PAYLOAD),
    ("cred-not-utf8", hello_frame(b"\0" * 4, 2, b"ab", 1, b"\x80"), NakReason.BAD_PAYLOAD),
]


@pytest.mark.parametrize(("data", "code"), [pytest.param(d, c, id=n) for n, d, c in HELLO_ERRORS])
def test_hub_refuses_bad_hello(data: bytes, code: NakReason) -> None:
    expect_remote(NativeCodec(Role.HUB), data, code)


def test_hello_limits_are_inclusive() -> None:
    frame = hello_frame(b"\0\0\0\x01", 128, b"d" * 128, 255, b"c" * 255)
    codec = NativeCodec(Role.HUB, max_frame_bytes=1024)
    codec.receive_data(frame)
    assert codec.next_event() == Hello("d" * 128, "c" * 255, 1, 0)


@pytest.mark.parametrize("vector", NATIVE_VECTORS[2:], ids=lambda v: v.name)
def test_hub_requires_hello_first(vector: Vector) -> None:
    error = expect_remote(NativeCodec(Role.HUB), vector.wire, NakReason.NOT_AUTHENTICATED)
    assert error.seq == vector.event.seq  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "vector",
    [v for v in NATIVE_VECTORS if v.senders == (Role.DEVICE,)],
    ids=lambda v: v.name,
)
def test_device_refuses_device_frames(vector: Vector) -> None:
    expect_remote(device_ready(), vector.wire, NakReason.MALFORMED)


def test_oversize_is_refused_from_the_header_alone() -> None:
    header = struct.pack(">2sBBBII", b"HB", 1, 0x02, 0, 0xFFFF_FFF0, 77)
    codec = hub_ready()
    codec.receive_data(header)  # no payload follows, and none is waited for
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert (info.value.code, info.value.seq) == (NakReason.TOO_LARGE, 77)


def test_max_frame_bytes_counts_header_and_crc() -> None:
    limit = 100
    fits = build_frame(0x02, 1, data_payload({"k": "v" * 66}))
    assert len(fits) == limit
    codec = hub_ready(max_frame_bytes=limit)
    codec.receive_data(fits)
    assert isinstance(codec.next_event(), Telemetry)
    too_big = build_frame(0x02, 2, data_payload({"k": "v" * 67}))
    expect_remote(codec, too_big[:13], NakReason.TOO_LARGE)


def test_errors_are_sticky() -> None:
    codec = hub_ready()
    error = expect_remote(codec, build_frame(0x07, 3, crc=1), NakReason.BAD_CRC)
    codec.receive_data(NATIVE_VECTORS[8].wire)  # ignored once dead
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as info:
            codec.next_event()
        assert info.value is error
    # The caller can still NAK the offending frame.
    assert codec.send(Nak(error.seq, NakReason(error.code), str(error)))


def test_frames_before_an_error_are_delivered() -> None:
    codec = hub_ready()
    codec.receive_data(NATIVE_VECTORS[8].wire + build_frame(0x07, 9, crc=1))
    assert codec.next_event() == Ping(4)
    with pytest.raises(RemoteProtocolError):
        codec.next_event()


# -- end of stream -----------------------------------------------------------


def test_end_of_stream_after_complete_frames() -> None:
    codec = NativeCodec(Role.HUB)
    codec.receive_data(HELLO_WIRE + NATIVE_VECTORS[8].wire)
    codec.receive_data(b"")
    assert drain(codec) == [HELLO, Ping(4), ConnectionClosed()]
    assert codec.next_event() == ConnectionClosed()  # and stays closed
    codec.receive_data(b"")  # a second end of stream is harmless


@pytest.mark.parametrize("cut", [1, 2, 12, 13, 20, len(HELLO_WIRE) - 1])
def test_end_of_stream_mid_frame(cut: int) -> None:
    codec = NativeCodec(Role.HUB)
    codec.receive_data(HELLO_WIRE[:cut])
    assert codec.next_event() is NEED_DATA
    codec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-frame") as info:
        codec.next_event()
    assert info.value.code == NakReason.MALFORMED


def test_data_after_end_of_stream_is_a_local_error() -> None:
    codec = NativeCodec(Role.HUB)
    codec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        codec.receive_data(HELLO_WIRE)


def test_receive_buffer_is_compacted() -> None:
    device = device_ready()
    frame = device.send(Telemetry(1, {"v": "x" * 200}))
    stream = HELLO_WIRE + frame * 2000
    hub = NativeCodec(Role.HUB)
    count = 0
    for at in range(0, len(stream), 1000):
        hub.receive_data(stream[at : at + 1000])
        count += len(drain(hub))
        assert len(hub._buf) < 64 * 1024 + 2000
    assert count == 2001


# -- send errors -------------------------------------------------------------

HUB_MAY_NOT_SEND = [
    HELLO,
    Telemetry(1, {}),
    DeviceEvent(1, {}),
    StateReport(1, {}),
    CommandResult(1, "c", True),
    ConnectionClosed(),
]


@pytest.mark.parametrize("event", HUB_MAY_NOT_SEND, ids=lambda e: type(e).__name__)
def test_hub_may_not_send(event: Event) -> None:
    with pytest.raises(LocalProtocolError) as info:
        NativeCodec(Role.HUB).send(event)
    assert info.value.code == NakReason.MALFORMED


@pytest.mark.parametrize(
    "event", [Command(1, "c", "n"), HELLO, ConnectionClosed()], ids=lambda e: type(e).__name__
)
def test_device_may_not_send_after_hello(event: Event) -> None:
    with pytest.raises(LocalProtocolError) as info:
        device_ready().send(event)
    assert info.value.code == NakReason.MALFORMED


@pytest.mark.parametrize(
    "event", [Telemetry(1, {}), Ping(1), Ack(1)], ids=lambda e: type(e).__name__
)
def test_device_must_send_hello_first(event: Event) -> None:
    with pytest.raises(LocalProtocolError) as info:
        NativeCodec(Role.DEVICE).send(event)
    assert info.value.code == NakReason.NOT_AUTHENTICATED


BAD_SENDS: list[tuple[str, Event, NakReason]] = [
    ("id-empty", Hello("", "pw"), NakReason.MALFORMED),
    ("id-129-bytes", Hello("é" * 64 + "x", "pw"), NakReason.MALFORMED),
    ("credential-256", Hello("d", "c" * 256), NakReason.MALFORMED),
    ("id-surrogate", Hello("\ud800", "pw"), NakReason.BAD_PAYLOAD),
    ("id-not-str", Hello(7, "pw"), NakReason.BAD_PAYLOAD),  # type: ignore[arg-type]
    ("boot-id-negative", Hello("d", "pw", boot_id=-1), NakReason.MALFORMED),
    ("boot-id-too-big", Hello("d", "pw", boot_id=2**32), NakReason.MALFORMED),
    ("seq-too-big", Hello("d", "pw", seq=2**32), NakReason.MALFORMED),
]


@pytest.mark.parametrize(("event", "code"), [pytest.param(e, c, id=n) for n, e, c in BAD_SENDS])
def test_device_refuses_bad_hello(event: Event, code: NakReason) -> None:
    codec = NativeCodec(Role.DEVICE)
    with pytest.raises(LocalProtocolError) as info:
        codec.send(event)
    assert info.value.code == code
    # A refused HELLO does not count as sent.
    with pytest.raises(LocalProtocolError):
        codec.send(Ping(1))
    assert codec.send(HELLO) == HELLO_WIRE


BAD_DEVICE_SENDS: list[tuple[str, Event, NakReason]] = [
    ("seq-negative", Telemetry(-1, {}), NakReason.MALFORMED),
    ("seq-bool", Ping(True), NakReason.MALFORMED),
    ("time-negative", Telemetry(1, {}, -5), NakReason.MALFORMED),
    ("time-too-big", StateReport(1, {}, 2**64), NakReason.MALFORMED),
    ("payload-list", DeviceEvent(1, [1]), NakReason.BAD_PAYLOAD),  # type: ignore[arg-type]
    ("payload-nan", Telemetry(1, {"x": float("nan")}), NakReason.BAD_PAYLOAD),
    ("payload-set", Telemetry(1, {"x": {1}}), NakReason.BAD_PAYLOAD),
    ("too-large", Telemetry(1, {"x": "y" * 70000}), NakReason.TOO_LARGE),
    ("nak-reason-0", Nak(1, 0), NakReason.MALFORMED),  # type: ignore[arg-type]
    ("result-ok-int", CommandResult(1, "c", 1), NakReason.BAD_PAYLOAD),  # type: ignore[arg-type]
    ("result-empty-id", CommandResult(1, "", True), NakReason.BAD_PAYLOAD),
    ("result-unserializable", CommandResult(1, "c", True, object()), NakReason.BAD_PAYLOAD),
]


@pytest.mark.parametrize(
    ("event", "code"), [pytest.param(e, c, id=n) for n, e, c in BAD_DEVICE_SENDS]
)
def test_device_refuses_bad_events(event: Event, code: NakReason) -> None:
    with pytest.raises(LocalProtocolError) as info:
        device_ready().send(event)
    assert info.value.code == code


@pytest.mark.parametrize(
    "event",
    [Command(1, "", "n"), Command(1, "c", ""), Command(1, "c", "n", [])],  # type: ignore[arg-type]
    ids=["empty-id", "empty-name", "args-list"],
)
def test_hub_refuses_bad_commands(event: Event) -> None:
    with pytest.raises(LocalProtocolError) as info:
        NativeCodec(Role.HUB).send(event)
    assert info.value.code == NakReason.BAD_PAYLOAD


def test_send_accepts_any_mapping_and_int_nak_reason() -> None:
    from types import MappingProxyType

    device = device_ready()
    frame = device.send(
        Telemetry(1, MappingProxyType({"temp_c": 21.5, "rh": 40}), 1_700_000_000_000)
    )
    assert frame == NATIVE_VECTORS[2].wire
    assert device.send(Nak(2, 8, "not a JSON object")) == NATIVE_VECTORS[6].wire  # type: ignore[arg-type]


# -- construction and lookup -------------------------------------------------


def test_codec_satisfies_the_interface() -> None:
    codec = NativeCodec(Role.HUB)
    assert isinstance(codec, Codec)
    assert NativeCodec.name == "native"
    assert codec.role is Role.HUB
    assert codec.max_frame_bytes == 65536


@pytest.mark.parametrize("size", [0, 63, -1])
def test_max_frame_bytes_has_a_floor(size: int) -> None:
    with pytest.raises(ValueError):
        NativeCodec(Role.HUB, max_frame_bytes=size)


def test_available_codecs() -> None:
    codecs = available_codecs()
    assert codecs["native"] is NativeCodec
    assert codecs["lines"] is LinesCodec


def test_load_codec() -> None:
    assert load_codec("native") is NativeCodec
    assert load_codec("lines") is LinesCodec
    with pytest.raises(ConfigError, match="nope") as info:
        load_codec("nope")
    assert info.value.key == "tcp.listeners.codec"
    assert "native" in str(info.value)
