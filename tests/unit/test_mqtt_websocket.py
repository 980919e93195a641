"""`WebSocketStream` (bridges.mqtt.websocket) fed its bytes whole, one at a time and in
random splits: the same MQTT bytes come out, and the same refusals.

No socket: an `asyncio.StreamReader` is fed the client's bytes, and what the
stream writes back is collected.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from bridges.mqtt.websocket import HandshakeFailed, WebSocketStream
from hub.mqtt_rules import TOO_LARGE, ProtocolViolation

REQUEST = (
    b"GET /mqtt HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)
#: CONNECT (client id "c") and PINGREQ.
STREAM = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c" + b"\xc0\x00"


def frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True, key: bytes = b"abcd") -> bytes:
    """A client's frame (payload under 126 bytes), masked with `key`."""
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([opcode | (0x80 if fin else 0), 0x80 | len(payload)]) + key + masked


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise AssertionError("no EOF expected")


def splits(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng, out, at = random.Random(len(data)), [], 0
    while at < len(data):
        n = rng.randint(1, 7)
        out.append(data[at : at + n])
        at += n
    return out


async def read_all(frames: bytes, how: str, max_packet_bytes: int = 1024) -> tuple[bytes, Sink]:
    """The MQTT bytes the stream hands out until its end, and what it wrote."""
    reader, sink = asyncio.StreamReader(), Sink()
    stream = WebSocketStream(reader, sink, max_packet_bytes=max_packet_bytes)
    for chunk in splits(REQUEST, how):
        reader.feed_data(chunk)
    await stream.open(5.0)

    async def feed() -> None:
        for chunk in splits(frames, how):
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    out = bytearray()
    try:
        while True:
            out += await stream.readexactly(1)
    except asyncio.IncompleteReadError as exc:
        assert exc.partial == b""
    finally:
        await feeding
    return bytes(out), sink


HOW = ["whole", "bytes", "random"]


@pytest.mark.parametrize("how", HOW)
def test_packets_come_out_of_frames_however_they_are_cut(how: str) -> None:
    frames = (
        frame(STREAM[:5], fin=False)  # a message in three fragments, a ping between
        + frame(b"hi", 0x9)
        + frame(STREAM[5:9], 0x0, fin=False)
        + frame(STREAM[9:], 0x0)
        + frame(STREAM)  # the two packets again, in one frame
        + frame(b"\x03\xe8", 0x8)  # close, 1000
    )
    out, sink = asyncio.run(read_all(frames, how))
    assert out == STREAM + STREAM
    assert sink.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Protocol: mqtt\r\n" in sink.data
    assert sink.data.endswith(b"\x8a\x02hi" + b"\x88\x02\x03\xe8")  # pong, then close echoed


@pytest.mark.parametrize("how", HOW)
def test_a_text_frame_is_a_violation(how: str) -> None:
    with pytest.raises(ProtocolViolation, match="text frame"):
        asyncio.run(read_all(frame(STREAM) + frame(b"\xc0\x00", 0x1), how))


@pytest.mark.parametrize("how", HOW)
def test_a_frame_above_the_largest_packet_is_refused_from_its_header(how: str) -> None:
    big = bytes([0x82, 0x80 | 126]) + (2000).to_bytes(2, "big") + b"abcd"  # no body sent
    with pytest.raises(ProtocolViolation) as caught:
        asyncio.run(read_all(big, how))
    assert caught.value.reason == TOO_LARGE


@pytest.mark.parametrize("how", HOW)
def test_a_stream_cut_inside_a_frame_ends_without_its_partial_bytes(how: str) -> None:
    out, _sink = asyncio.run(read_all(frame(STREAM)[:-3], how))
    assert out == b""


def test_a_read_past_the_end_takes_the_partial_bytes_with_it() -> None:
    # As asyncio.StreamReader does. The fuzz target found the bytes handed out
    # again by the next read, after the reader had reported the end of stream.
    async def run() -> None:
        reader, sink = asyncio.StreamReader(), Sink()
        stream = WebSocketStream(reader, sink, max_packet_bytes=1024)
        reader.feed_data(REQUEST)
        await stream.open(5.0)
        reader.feed_data(frame(STREAM[:10]))
        reader.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError) as caught:
            await stream.readexactly(100)
        assert caught.value.partial == STREAM[:10]
        with pytest.raises(asyncio.IncompleteReadError) as again:
            await stream.readexactly(1)
        assert again.value.partial == b""

    asyncio.run(run())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (REQUEST.replace(b"/mqtt", b"/ws"), b"404"),
        (REQUEST.replace(b"Sec-WebSocket-Protocol: mqtt\r\n", b""), b"400"),
        (REQUEST + frame(STREAM), b"400"),  # a frame before the answer
    ],
)
def test_refused_handshakes_get_an_http_error(request_bytes: bytes, status: bytes) -> None:
    async def run() -> Sink:
        reader, sink = asyncio.StreamReader(), Sink()
        reader.feed_data(request_bytes)
        with pytest.raises(HandshakeFailed):
            await WebSocketStream(reader, sink, max_packet_bytes=1024).open(5.0)
        return sink

    assert asyncio.run(run()).data.startswith(b"HTTP/1.1 " + status + b" ")
