"""Fuzz target `mqtt`: the MQTT 3.1.1 rule book and the packet reader.

Layer: tooling (see `fuzz/__init__.py`).

The first byte of an input chooses what is fuzzed:

- bit 0 clear, the rules: the second byte is a fixed header (type and
  flags), bit 1 says whether it is the connection's first packet, and the
  rest is the packet's body. `check_packet` may only raise `ProtocolViolation`.
- bit 0 set, the reader: the rest is a client's whole stream. `PacketReader`
  hands out whole packets, each of which passes the rules again; it reports
  one violation at most and then only end of stream; it never raises and
  never waits for bytes it already has. With bit 2 set too, the stream is
  WebSocket frames after a valid opening handshake (MQTT over WebSockets,
  `bridges.mqtt.websocket`): the same reader reads their payload, with the
  same rules. Seeds mask their frames with the key 0, so mutations of the
  payload stay readable. (MQTT over TLS adds no parser of ours: its bytes
  reach this same reader once OpenSSL decrypted them.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from fuzz.instrument import instrumented

with instrumented():
    from bridges.mqtt.reader import ByteStream, PacketReader
    from bridges.mqtt.websocket import HandshakeFailed, WebSocketStream
    from hub.mqtt_rules import ProtocolViolation, check_packet

from fuzz.codec_harness import Finding

#: Small, so that the fuzzer also reaches the size refusal.
MAX_PACKET_BYTES = 1024
#: A stream that is all in the buffer (end of stream fed) must be read at once.
HANG_S = 5.0

_loop = asyncio.new_event_loop()

#: The opening handshake in front of a WebSocket input (paho's, shortened).
HANDSHAKE = (
    b"GET /mqtt HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)


class _Sink:
    """What the WebSocket stream writes back (its handshake answer, pongs, close)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise AssertionError("can_write_eof is False")


def _rules(data: bytes) -> None:
    if len(data) < 2:
        return
    first = bool(data[0] & 2)
    with contextlib.suppress(ProtocolViolation):
        check_packet(data[1] >> 4, data[1] & 0x0F, data[2:], first=first)


def _split(packet: bytes) -> tuple[int, int, bytes]:
    """Fixed header, and the body after the remaining length."""
    at = 1
    while packet[at] & 0x80:
        at += 1
    return packet[0] >> 4, packet[0] & 0x0F, packet[at + 1 :]


async def _read_stream(data: bytes, *, websocket: bool) -> None:
    inner = asyncio.StreamReader()
    source: ByteStream = inner
    if websocket:
        # The handshake alone first: a client sends no frame before the answer.
        inner.feed_data(HANDSHAKE)
        sink = _Sink()
        stream = WebSocketStream(inner, sink, max_packet_bytes=MAX_PACKET_BYTES)
        try:
            await stream.open(HANG_S)
        except HandshakeFailed as exc:
            raise Finding(f"a valid opening handshake was refused: {exc}") from exc
        if not sink.data.startswith(b"HTTP/1.1 101 "):
            raise Finding("the opening handshake was not answered with 101")
        source = stream
    inner.feed_data(data)
    inner.feed_eof()
    violations: list[ProtocolViolation] = []
    reader = PacketReader(
        source,
        max_packet_bytes=MAX_PACKET_BYTES,
        connect_timeout_s=HANG_S * 4,
        peer="fuzz",
        reply=lambda _bytes: None,
        on_violation=lambda violation, _peer: violations.append(violation),
    )
    # An acknowledgement "fits" its flow for odd packet ids only: both branches.
    reader.check_ack = lambda _type, packet_id: None if packet_id % 2 else "does not fit"
    packets: list[bytes] = []
    while True:
        packet = await reader.read(-1)
        if not packet:
            break
        packets.append(packet)
        if len(packets) > len(data):
            raise Finding("more packets than bytes")
    for _ in range(2):
        if await reader.read(-1) != b"":
            raise Finding("data after end of stream")
    if len(violations) > 1:
        raise Finding(f"{len(violations)} violations reported for one connection")
    for n, packet in enumerate(packets):
        packet_type, flags, body = _split(packet)
        try:
            check_packet(packet_type, flags, body, first=n == 0)
        except ProtocolViolation as exc:
            raise Finding(f"the reader handed out packet {n}, which breaks the rules") from exc


def one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1 == 0:
        _rules(data)
        return
    try:
        websocket = bool(data[0] & 4)
        _loop.run_until_complete(
            asyncio.wait_for(_read_stream(data[1:], websocket=websocket), HANG_S)
        )
    except TimeoutError:
        raise Finding(f"the reader waited more than {HANG_S} s on a complete stream") from None


# -- seeds: well-formed packets of every type a client sends ------------------


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + _length(len(body)) + body


def _connect(flags: int, *fields: bytes, keep_alive: int = 60) -> bytes:
    body = _text("MQTT") + bytes([4, flags]) + keep_alive.to_bytes(2, "big") + b"".join(fields)
    return _packet(0x10, body)


def _frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True) -> bytes:
    """A client's frame, masked with the key 0 (its payload stays as it is)."""
    head = bytes([opcode | (0x80 if fin else 0)])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


def _websocket_seeds(streams: list[bytes]) -> Iterator[bytes]:
    """The reader's streams in WebSocket frames: one frame, a frame per packet
    split in two (a continuation), a ping and a close between; a text frame."""
    for stream in streams:
        yield b"\x05" + _frame(stream)
        half = len(stream) // 2
        yield b"\x05" + _frame(stream[:half], fin=False) + _frame(stream[half:], 0x0)
        yield b"\x05" + _frame(stream[:half]) + _frame(b"hi", 0x9) + _frame(stream[half:])
        yield b"\x05" + _frame(stream) + _frame(b"\x03\xe8", 0x8)
    yield b"\x05" + _frame(streams[0], 0x1)


def seeds() -> Iterator[bytes]:
    yield from _websocket_seeds([s[1:] for s in _plain_seeds() if s[0] == 1])
    yield from _plain_seeds()


def _plain_seeds() -> Iterator[bytes]:
    connects = [
        _connect(0x02, _text("dev-1")),
        _connect(0xC2, _text("dev-1"), _text("dev-1"), _text("s3cret")),
        _connect(0x2E, _text("dev-1"), _text("devices/dev-1/state"), _text('{"online":false}')),
        _connect(0x06, _text("dev-1"), _text("devices/dev-1/state"), _text("")),
        _connect(0x00, _text(""), keep_alive=0),
    ]
    publishes = [
        _packet(0x30, _text("devices/dev-1/telemetry") + b'{"t":21.5}'),
        _packet(0x32, _text("devices/dev-1/telemetry") + b"\x00\x01" + b'{"seq":1,"values":{}}'),
        _packet(0x34, _text("devices/dev-1/events") + b"\x00\x02" + b"{}"),
        _packet(0x3B, _text("devices/dev-1/state") + b"\x00\x03" + b"{}"),
    ]
    others = [
        _packet(0x82, b"\x00\x04" + _text("devices/dev-1/commands/#") + b"\x01"),
        _packet(0xA2, b"\x00\x05" + _text("devices/dev-1/commands/#")),
        _packet(0x40, b"\x00\x01"),
        _packet(0x50, b"\x00\x02"),
        _packet(0x62, b"\x00\x02"),
        _packet(0x70, b"\x00\x02"),
        _packet(0xC0, b""),
        _packet(0xE0, b""),
    ]
    for connect in connects:
        yield b"\x01" + connect + b"".join(publishes) + b"".join(others)
        yield b"\x02" + connect[:1] + _split(connect)[2]  # the rules, as a first packet
    for packet in publishes + others:
        yield b"\x01" + connects[0] + packet
        yield b"\x00" + packet[:1] + _split(packet)[2]
