"""Unit tests for the lines protocol codec (docs/protocol.md, "The lines protocol")."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.errors import LocalProtocolError, RemoteProtocolError
from hub.protocol.base import Codec
from hub.protocol.events import (
    NEED_DATA,
    Ack,
    Command,
    ConnectionClosed,
    Event,
    Hello,
    Nak,
    NakReason,
    NeedData,
    Ping,
    Role,
    Telemetry,
)
from hub.protocol.lines import LinesCodec
from tests.unit.protocol_vectors import (
    HELLO,
    LINES_ACCEPTED,
    LINES_VECTORS,
    Vector,
    device_events,
    hub_events,
    json_objects,
    random_chunks,
    seqs,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
HELLO_LINE = LINES_VECTORS[0].wire


def drain(codec: LinesCodec) -> list[Event]:
    events: list[Event] = []
    while True:
        event = codec.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def feed(codec: LinesCodec, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        events += drain(codec)
    return events


def hub_ready(**kwargs: int) -> LinesCodec:
    codec = LinesCodec(Role.HUB, **kwargs)
    codec.receive_data(HELLO_LINE)
    assert codec.next_event() == HELLO
    return codec


def device_ready(**kwargs: int) -> LinesCodec:
    codec = LinesCodec(Role.DEVICE, **kwargs)
    assert codec.send(HELLO) == HELLO_LINE
    return codec


def ready(role: Role) -> LinesCodec:
    return hub_ready() if role is Role.HUB else device_ready()


def expect_remote(codec: LinesCodec, data: bytes, code: NakReason) -> RemoteProtocolError:
    codec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(codec)
    assert info.value.code == code, info.value
    return info.value


def splits(data: bytes) -> Iterator[list[bytes]]:
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for seed in range(3):
        rng = random.Random(seed)
        yield random_chunks(data, [rng.randrange(len(data)) for _ in range(4)])


def vector_cases(direction: str) -> Iterator[Any]:
    for vector in LINES_VECTORS:
        roles = vector.senders if direction == "send" else vector.receivers
        for role in roles:
            yield pytest.param(vector, role, id=f"{vector.name}-{role.value}")


# -- vectors -----------------------------------------------------------------


@pytest.mark.parametrize(("vector", "role"), list(vector_cases("send")))
def test_send_matches_golden_vector(vector: Vector, role: Role) -> None:
    codec = LinesCodec(role) if isinstance(vector.event, Hello) else ready(role)
    assert codec.send(vector.event) == vector.wire


@pytest.mark.parametrize(("vector", "role"), list(vector_cases("receive")))
def test_golden_vector_decodes_in_any_split(vector: Vector, role: Role) -> None:
    for chunks in splits(vector.wire):
        codec = LinesCodec(role) if isinstance(vector.event, Hello) else ready(role)
        assert feed(codec, chunks) == [vector.event]
    # A CRLF line ending means the same.
    codec = LinesCodec(role) if isinstance(vector.event, Hello) else ready(role)
    assert feed(codec, [vector.wire[:-1] + b"\r\n"]) == [vector.event]


def test_golden_lines_are_in_the_document() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for vector in LINES_VECTORS:
        assert vector.wire.decode().rstrip("\n") in text, vector.name


@pytest.mark.parametrize(
    ("role", "line", "event"), [pytest.param(*case, id=case[1].decode()) for case in LINES_ACCEPTED]
)
def test_lenient_lines(role: Role, line: bytes, event: Event) -> None:
    codec = LinesCodec(role) if isinstance(event, Hello) else ready(role)
    assert feed(codec, [line]) == [event]


def test_empty_lines_are_ignored_and_eof_closes() -> None:
    codec = LinesCodec(Role.HUB)
    events = feed(codec, [b"\n\r\n" + HELLO_LINE + b"\n", b"PING 4\r", b"\n", b""])
    assert events == [HELLO, Ping(4), ConnectionClosed()]
    assert codec.next_event() == ConnectionClosed()


# -- round trips and garbage -------------------------------------------------

tokens = st.text(
    st.characters(codec="utf-8", exclude_characters=" \r\n"),
    min_size=1,
    max_size=32,
)
hellos = st.builds(Hello, tokens, tokens, st.integers(0, 2**32 - 1), st.just(0))
one_line_naks = st.builds(
    Nak,
    seqs,
    st.sampled_from(list(NakReason)),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n")),
)


def no_line_breaks(event: Event) -> bool:
    return not (isinstance(event, Nak) and ("\n" in event.message or "\r" in event.message))


@settings(max_examples=150, deadline=None)
@given(
    hello=hellos,
    events=st.lists(device_events.filter(no_line_breaks) | one_line_naks, max_size=8),
    cuts=st.lists(st.integers(0, 10**6)),
)
def test_round_trip_device_to_hub(hello: Hello, events: list[Event], cuts: list[int]) -> None:
    device = LinesCodec(Role.DEVICE)
    stream = device.send(hello) + b"".join(device.send(e) for e in events)
    hub = LinesCodec(Role.HUB)
    assert feed(hub, [*random_chunks(stream, cuts), b""]) == [hello, *events, ConnectionClosed()]


@settings(max_examples=100, deadline=None)
@given(events=st.lists(hub_events.filter(no_line_breaks), max_size=8), cuts=st.lists(st.integers()))
def test_round_trip_hub_to_device(events: list[Event], cuts: list[int]) -> None:
    hub = LinesCodec(Role.HUB)
    stream = b"".join(hub.send(e) for e in events)
    assert feed(device_ready(), random_chunks(stream, cuts)) == events


line_garbage = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: HELLO_LINE + b),
    st.lists(
        st.sampled_from([b"HELLO", b"T", b"E", b"S", b"R", b"ACK", b"NAK", b"PING", b"1", b" "])
        | st.binary(max_size=5),
        max_size=12,
    ).map(lambda parts: HELLO_LINE + b" ".join(parts) + b"\n"),
)


@settings(max_examples=300, deadline=None)
@given(data=line_garbage, cuts=st.lists(st.integers(0, 10**6), max_size=5))
def test_garbage_yields_only_events_or_remote_errors(data: bytes, cuts: list[int]) -> None:
    codec = LinesCodec(Role.HUB, max_frame_bytes=128)
    try:
        for chunk in [*random_chunks(data, cuts), b""]:
            codec.receive_data(chunk)
            drain(codec)
    except RemoteProtocolError as exc:
        assert exc.code in set(NakReason)
        with pytest.raises(RemoteProtocolError):
            codec.next_event()


# -- errors ------------------------------------------------------------------

HUB_ERRORS = [
    ("unknown-verb", b"X 5\n", NakReason.UNKNOWN_TYPE, 5),
    ("lower-case-verb", b"ping 5\n", NakReason.UNKNOWN_TYPE, 5),
    ("not-utf8", b"PING \xff\n", NakReason.BAD_PAYLOAD, 0),
    ("stray-cr", b"PING 5\r\r\n", NakReason.MALFORMED, 0),
    ("no-seq", b"PING\n", NakReason.MALFORMED, 0),
    ("signed-seq", b"PING +5\n", NakReason.MALFORMED, 0),
    ("seq-too-big", b"ACK 4294967296\n", NakReason.MALFORMED, 0),
    ("double-space", b"PING  5\n", NakReason.MALFORMED, 0),
    ("trailing-field", b"ACK 5 6\n", NakReason.MALFORMED, 5),
    ("telemetry-short", b"T 5 0\n", NakReason.MALFORMED, 5),
    ("telemetry-bad-time", b"T 5 -1 {}\n", NakReason.MALFORMED, 5),
    ("telemetry-bad-json", b"T 5 0 {x}\n", NakReason.BAD_PAYLOAD, 5),
    ("telemetry-array", b"T 5 0 [1]\n", NakReason.BAD_PAYLOAD, 5),
    ("event-nan", b'E 5 0 {"a":NaN}\n', NakReason.BAD_PAYLOAD, 5),
    ("nak-no-reason", b"NAK 5\n", NakReason.MALFORMED, 5),
    ("nak-unknown-reason", b"NAK 5 99 what\n", NakReason.MALFORMED, 5),
    ("result-bad", b'R 5 {"id":"a"}\n', NakReason.BAD_PAYLOAD, 5),
    ("command-to-hub", b'C 5 {"id":"a","name":"n","args":{}}\n', NakReason.MALFORMED, 5),
    ("second-hello", HELLO_LINE, NakReason.MALFORMED, 0),
]


@pytest.mark.parametrize(
    ("data", "code", "seq"), [pytest.param(d, c, s, id=n) for n, d, c, s in HUB_ERRORS]
)
def test_hub_refuses(data: bytes, code: NakReason, seq: int) -> None:
    assert expect_remote(hub_ready(), data, code).seq == seq


@pytest.mark.parametrize(
    "line",
    [b"HELLO\n", b"HELLO dev\n", b"HELLO dev pw 1 2\n", b"HELLO  pw\n", b"HELLO dev pw x\n"],
)
def test_hub_refuses_bad_hello(line: bytes) -> None:
    expect_remote(LinesCodec(Role.HUB), line, NakReason.MALFORMED)


def test_hub_requires_hello_first() -> None:
    error = expect_remote(LinesCodec(Role.HUB), b"T 3 0 {}\n", NakReason.NOT_AUTHENTICATED)
    assert error.seq == 3


@pytest.mark.parametrize("line", [HELLO_LINE, b"T 1 0 {}\n", b'R 1 {"id":"a","ok":true}\n'])
def test_device_refuses_device_lines(line: bytes) -> None:
    expect_remote(device_ready(), line, NakReason.MALFORMED)


def test_overlong_line_is_refused_without_its_end() -> None:
    codec = hub_ready(max_frame_bytes=64)
    line = b'T 1 0 {"k":"' + b"v" * 200
    codec.receive_data(line[:63])
    assert codec.next_event() is NEED_DATA
    codec.receive_data(line[63:64])
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.code == NakReason.TOO_LARGE


def test_line_limit_includes_the_newline() -> None:
    fits = b'T 1 0 {"k":"' + b"v" * 50 + b'"}\n'
    assert len(fits) == 65
    expect_remote(hub_ready(max_frame_bytes=64), fits, NakReason.TOO_LARGE)
    codec = hub_ready(max_frame_bytes=65)
    codec.receive_data(fits)
    assert codec.next_event() == Telemetry(1, {"k": "v" * 50})


def test_end_of_stream_mid_line() -> None:
    codec = LinesCodec(Role.HUB)
    codec.receive_data(HELLO_LINE[:-1])
    codec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-line") as info:
        codec.next_event()
    assert info.value.code == NakReason.MALFORMED


def test_errors_are_sticky_and_data_after_eof_is_local() -> None:
    codec = hub_ready()
    error = expect_remote(codec, b"BOGUS\n", NakReason.UNKNOWN_TYPE)
    codec.receive_data(b"PING 1\n")
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value is error
    assert codec.send(Nak(0, NakReason.UNKNOWN_TYPE, str(error))).startswith(b"NAK 0 11 ")
    closed = LinesCodec(Role.HUB)
    closed.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        closed.receive_data(b"PING 1\n")


BAD_SENDS: list[tuple[str, LinesCodec, Event, NakReason]] = [
    ("hello-seq", LinesCodec(Role.DEVICE), Hello("d", "pw", seq=1), NakReason.MALFORMED),
    ("hello-space-id", LinesCodec(Role.DEVICE), Hello("a b", "pw"), NakReason.MALFORMED),
    ("hello-empty-credential", LinesCodec(Role.DEVICE), Hello("d", ""), NakReason.MALFORMED),
    ("hello-newline", LinesCodec(Role.DEVICE), Hello("d", "p\nw"), NakReason.MALFORMED),
    ("before-hello", LinesCodec(Role.DEVICE), Ping(1), NakReason.NOT_AUTHENTICATED),
    ("hub-telemetry", LinesCodec(Role.HUB), Telemetry(1, {}), NakReason.MALFORMED),
    ("seq-negative", LinesCodec(Role.HUB), Ack(-1), NakReason.MALFORMED),
    ("command-args", LinesCodec(Role.HUB), Command(1, "c", "n", {"x": {1}}), NakReason.BAD_PAYLOAD),
    (
        "too-large",
        LinesCodec(Role.HUB, max_frame_bytes=64),
        Nak(1, NakReason.UNKNOWN_DEVICE, "x" * 60),
        NakReason.TOO_LARGE,
    ),
    ("closed", LinesCodec(Role.HUB), ConnectionClosed(), NakReason.MALFORMED),
]


@pytest.mark.parametrize(
    ("codec", "event", "code"), [pytest.param(c, e, k, id=n) for n, c, e, k in BAD_SENDS]
)
def test_send_refuses(codec: LinesCodec, event: Event, code: NakReason) -> None:
    with pytest.raises(LocalProtocolError) as info:
        codec.send(event)
    assert info.value.code == code


@given(payload=json_objects)
@settings(max_examples=50, deadline=None)
def test_json_never_breaks_the_line(payload: dict[str, Any]) -> None:
    line = device_ready().send(Telemetry(1, payload))
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and b"\r" not in line


def test_nak_line_breaks_are_sent_as_spaces() -> None:
    nak = Nak(1, NakReason.INTERNAL, "a\nb\r\nc\rd")
    assert LinesCodec(Role.HUB).send(nak) == b"NAK 1 10 a b c d\n"


def test_codec_satisfies_the_interface() -> None:
    codec = LinesCodec(Role.DEVICE, max_frame_bytes=1024)
    assert isinstance(codec, Codec)
    assert LinesCodec.name == "lines"
    assert (codec.role, codec.max_frame_bytes) == (Role.DEVICE, 1024)
    with pytest.raises(ValueError):
        LinesCodec(Role.HUB, max_frame_bytes=10)
