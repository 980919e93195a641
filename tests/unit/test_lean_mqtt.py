"""Unit tests of the lean MQTT publisher: its packets as bytes, the packet splitter fed
whole, byte by byte and in random splits, and a loopback run against a broker
stand-in that checks what arrives and acknowledges it (or refuses the device)."""

from __future__ import annotations

import asyncio
import json
import random
import struct

import pytest

from firmware_sim.fleet import TRANSPORTS, FleetOptions, FleetSummary, run_fleet
from firmware_sim.lean_mqtt import (
    LeanMqttDevice,
    PacketReader,
    connect_packet,
    publish_packet,
    subscribe_packet,
)

# CONNECT of client "d1", user "d1", password "pw", keepalive 30, clean session.
CONNECT_D1 = bytes.fromhex("10 16 0004 4d515454 04 c2 001e 0002 6431 0002 6431 0002 7077")
# PUBLISH QoS 1, topic "a/b", packet id 7, payload "hi".
PUBLISH_Q1 = bytes.fromhex("32 09 0003 612f62 0007 6869")
# PUBLISH QoS 0, topic "a/b", payload "hi".
PUBLISH_Q0 = bytes.fromhex("30 07 0003 612f62 6869")


def test_connect_packet_bytes() -> None:
    assert connect_packet("d1", "d1", "pw", 30) == CONNECT_D1


def test_publish_packet_bytes_at_both_qos() -> None:
    topic = b"\x00\x03a/b"
    assert publish_packet(topic, b"hi", 1, 7) == PUBLISH_Q1
    assert publish_packet(topic, b"hi", 0, 0) == PUBLISH_Q0


def test_subscribe_packet_bytes() -> None:
    # SUBSCRIBE, packet id 1, filter "a/b" at QoS 1.
    assert subscribe_packet("a/b", 1, 1) == bytes.fromhex("82 08 0001 0003 612f62 01")


def test_publish_remaining_length_takes_two_bytes_past_127() -> None:
    packet = publish_packet(b"\x00\x01t", b"x" * 200, 1, 1)
    # 3 (topic) + 2 (packet id) + 200 = 205 = 0x4d + 1 * 128
    assert packet[:3] == bytes((0x32, 0xCD, 0x01))
    assert len(packet) == 3 + 205


STREAM = [
    (2, 0, b"\x00\x00"),  # CONNACK accepted
    (4, 0, b"\x00\x01"),  # PUBACK 1
    (13, 0, b""),  # PINGRESP
    (3, 2, b"\x00\x01t" + b"\x00\x09" + b"y" * 300),  # a PUBLISH with a 2-byte length
    (4, 0, b"\xff\xff"),  # PUBACK 65535
]


def _encode(kind: int, flags: int, body: bytes) -> bytes:
    size = len(body)
    length = bytearray()
    while True:
        size, digit = divmod(size, 128)
        length.append(digit | (0x80 if size else 0))
        if not size:
            break
    return bytes((kind << 4 | flags,)) + bytes(length) + body


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
def test_packet_reader_yields_the_same_packets_however_the_bytes_arrive(split: str) -> None:
    data = b"".join(_encode(*p) for p in STREAM)
    if split == "whole":
        chunks = [data]
    elif split == "bytes":
        chunks = [data[i : i + 1] for i in range(len(data))]
    else:
        rng = random.Random(14)
        chunks, at = [], 0
        while at < len(data):
            step = rng.randint(1, 40)
            chunks.append(data[at : at + step])
            at += step
    reader = PacketReader()
    found = [packet for chunk in chunks for packet in reader.feed(chunk)]
    assert found == STREAM


def test_packet_reader_refuses_a_remaining_length_over_four_bytes() -> None:
    with pytest.raises(ValueError):
        PacketReader().feed(b"\x40\xff\xff\xff\xff\x01")


def test_lean_mqtt_is_a_fleet_transport() -> None:
    assert TRANSPORTS["mqtt-lean"] is LeanMqttDevice


class _Broker:
    """A broker stand-in: CONNACK (or a refusal), PUBACK for every QoS 1 PUBLISH,
    each only after `ack_delay_s`; records what it received."""

    def __init__(self, *, refuse: int = 0, ack_delay_s: float = 0.0) -> None:
        self.refuse = refuse
        self.ack_delay_s = ack_delay_s
        self.published: list[tuple[str, dict[str, object]]] = []
        self.connects: list[tuple[str, str]] = []
        self.subscribed: list[tuple[str, int]] = []
        self.max_unacked = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Broker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packets = PacketReader()
        unacked = 0

        async def ack(packet_id: bytes) -> None:
            nonlocal unacked
            await asyncio.sleep(self.ack_delay_s)
            unacked -= 1
            writer.write(b"\x40\x02" + packet_id)

        tasks = []
        try:
            while data := await reader.read(65536):
                for kind, flags, body in packets.feed(data):
                    if kind == 1:
                        user_at = 10 + 2 + struct.unpack_from("!H", body, 10)[0]
                        size = struct.unpack_from("!H", body, user_at)[0]
                        user = body[user_at + 2 : user_at + 2 + size].decode()
                        pw_at = user_at + 2 + size
                        size = struct.unpack_from("!H", body, pw_at)[0]
                        self.connects.append((user, body[pw_at + 2 : pw_at + 2 + size].decode()))
                        writer.write(bytes((0x20, 2, 0, self.refuse)))
                        if self.refuse:
                            writer.close()
                            return
                    elif kind == 3:
                        size = struct.unpack_from("!H", body)[0]
                        topic = body[2 : 2 + size].decode()
                        rest = body[2 + size :]
                        if flags & 0x06:
                            unacked += 1
                            self.max_unacked = max(self.max_unacked, unacked)
                            tasks.append(asyncio.create_task(ack(rest[:2])))
                            rest = rest[2:]
                        self.published.append((topic, json.loads(rest)))
                    elif kind == 8:
                        assert flags == 0x02  # [MQTT-3.8.1-1]
                        size = struct.unpack_from("!H", body, 2)[0]
                        self.subscribed.append((body[4 : 4 + size].decode(), body[4 + size]))
                        writer.write(b"\x90\x03" + body[:2] + b"\x01")
                    elif kind == 14:
                        break
        finally:
            for task in tasks:
                task.cancel()
            writer.close()


def _options(port: int, **overrides: object) -> FleetOptions:
    values: dict[str, object] = {
        "transport": "mqtt-lean",
        "host": "127.0.0.1",
        "port": port,
        "devices": [("lean-1", "pw1"), ("lean-2", "pw2")],
        "messages": 50,
        "window": 4,
        "drain_timeout_s": 5.0,
        "give_up_s": 10.0,
        **overrides,
    }
    return FleetOptions(**values)  # type: ignore[arg-type]


def test_lean_devices_publish_every_message_once_within_their_window() -> None:
    async def run() -> tuple[_Broker, FleetSummary]:
        async with _Broker(ack_delay_s=0.002) as broker:
            return broker, await run_fleet(_options(broker.port))

    broker, summary = asyncio.run(run())

    assert summary.ok, summary
    assert summary.sent == summary.acknowledged == 100
    assert sorted(broker.connects) == [("lean-1", "pw1"), ("lean-2", "pw2")]
    for device in ("lean-1", "lean-2"):
        seqs = [body["seq"] for topic, body in broker.published if topic.split("/")[1] == device]
        assert seqs == list(range(1, 51)), device
    assert {topic for topic, _ in broker.published} == {
        "devices/lean-1/telemetry",
        "devices/lean-2/telemetry",
    }
    assert 1 <= broker.max_unacked <= 4  # the window, per device and connection


def test_lean_devices_with_subscribe_subscribe_to_their_command_topic_first() -> None:
    async def run() -> tuple[_Broker, FleetSummary]:
        async with _Broker() as broker:
            return broker, await run_fleet(_options(broker.port, subscribe=True, messages=3))

    broker, summary = asyncio.run(run())

    assert summary.ok, summary
    assert sorted(broker.subscribed) == [
        ("devices/lean-1/commands", 1),
        ("devices/lean-2/commands", 1),
    ]
    assert summary.acknowledged == 6


def test_lean_devices_at_qos0_count_written_messages_as_acknowledged() -> None:
    async def run() -> tuple[_Broker, FleetSummary]:
        async with _Broker() as broker:
            summary = await run_fleet(_options(broker.port, qos=0, messages=20))
            await asyncio.sleep(0.1)  # let the stand-in read what was written
            return broker, summary

    broker, summary = asyncio.run(run())

    assert summary.ok, summary
    assert summary.acknowledged == 40
    assert len(broker.published) == 40


def test_a_bad_credential_refuses_the_device_for_good() -> None:
    async def run() -> tuple[_Broker, FleetSummary]:
        async with _Broker(refuse=4) as broker:
            return broker, await run_fleet(_options(broker.port, devices=[("lean-1", "nope")]))

    broker, summary = asyncio.run(run())

    assert summary.refused == 1
    assert summary.errors == 0
    assert summary.refused_reasons == {"Bad user name or password": 1}
    assert len(broker.connects) == 1  # not retried


def test_firmware_sim_mqtt_offers_the_lean_publishers() -> None:
    from click.testing import CliRunner

    from firmware_sim.cli import main

    result = CliRunner().invoke(main, ["mqtt", "--help"])
    assert result.exit_code == 0
    assert "--lean" in result.output and "Raw-socket publishers" in result.output
