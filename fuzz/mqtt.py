"""Fuzz target `mqtt`: the MQTT 3.1.1 rule book and the packet reader.

Layer: tooling (see `fuzz/__init__.py`).

The first byte of an input chooses what is fuzzed:

- bit 0 clear, the rules: the second byte is a fixed header (type and
  flags), bit 1 says whether it is the connection's first packet, and the
  rest is the packet's body. `check_packet` may only raise `ProtocolViolation`.
- bit 0 set, the reader: the rest is a client's whole stream. `PacketReader`
  hands out whole packets, each of which passes the rules again; it reports
  one violation at most and then only end of stream; it never raises and
  never waits for bytes it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from fuzz.instrument import instrumented

with instrumented():
    from bridges.mqtt.reader import PacketReader
    from hub.mqtt_rules import ProtocolViolation, check_packet

from fuzz.codec_harness import Finding

#: Small, so that the fuzzer also reaches the size refusal.
MAX_PACKET_BYTES = 1024
#: A stream that is all in the buffer (end of stream fed) must be read at once.
HANG_S = 5.0

_loop = asyncio.new_event_loop()


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


async def _read_stream(data: bytes) -> None:
    inner = asyncio.StreamReader()
    inner.feed_data(data)
    inner.feed_eof()
    violations: list[ProtocolViolation] = []
    reader = PacketReader(
        inner,
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
        _loop.run_until_complete(asyncio.wait_for(_read_stream(data[1:]), HANG_S))
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


def seeds() -> Iterator[bytes]:
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
