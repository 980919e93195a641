"""Many MQTT devices connecting at once: every one gets its CONNACK and a working subscription.

The real embedded broker on a free port (as in test_mqtt_embedded); the
devices are raw sockets (the lean simulator's packets) opened all at once,
more than `mqtt_max_handshakes` lets in together, so most of them wait for a
place. Then they all drop their connections and come back at once (the
storm after a restart of the hub). No timing is asserted: only that nobody
is refused or left without CONNACK, SUBACK and the command published to it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.lean_mqtt import PacketReader, connect_packet, subscribe_packet
from hub.topics import command_topic
from tests.integration.test_mqtt_embedded import WAIT_S, Broker, command
from tests.support.processes import wait_until

DEVICES = 300
#: Far fewer than DEVICES: most connections wait for a place.
HANDSHAKES = 8
CONNACK, PUBLISH, SUBACK = 2, 3, 9


@pytest.fixture
def storm_broker(tmp_path: Path) -> Iterator[Broker]:
    # 600 connects from one address in seconds: the limits per source address
    # (tested in test_address_limits) would refuse the storm's second half.
    b = Broker(
        tmp_path / "hub", mqtt_max_handshakes=HANDSHAKES, max_connects_per_address_per_s=0
    ).start()
    try:
        yield b
    finally:
        b.close()


class Device:
    """One raw MQTT 3.1.1 connection: CONNECT, SUBSCRIBE to its command topic, read."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.topic = command_topic("devices", device_id)
        self.packets = PacketReader()
        self.found: list[tuple[int, int, bytes]] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def next_packet(self) -> tuple[int, int, bytes]:
        assert self.reader is not None
        async with asyncio.timeout(60):  # a bound against hanging, not a timing check
            while not self.found:
                data = await self.reader.read(4096)
                assert data, f"{self.device_id}: the broker closed the connection"
                self.found += self.packets.feed(data)
        return self.found.pop(0)

    async def connect(self, port: int, credential: str) -> tuple[int, int]:
        """CONNACK return code and SUBACK grant."""
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.packets, self.found = PacketReader(), []
        self.writer.write(connect_packet(self.device_id, self.device_id, credential, 60))
        kind, _, body = await self.next_packet()
        assert kind == CONNACK, kind
        if body[1]:
            return body[1], -1
        self.writer.write(subscribe_packet(self.topic, 1, 1))
        kind, _, body = await self.next_packet()
        assert kind == SUBACK, kind
        return 0, body[-1]

    async def command(self) -> dict[str, Any]:
        kind, _, body = await self.next_packet()
        assert kind == PUBLISH, kind
        size = struct.unpack_from("!H", body)[0]
        assert body[2 : 2 + size].decode() == self.topic
        message: dict[str, Any] = json.loads(body[2 + size + 2 :])  # after the packet id
        return message

    def drop(self) -> None:
        assert self.writer is not None
        self.writer.transport.abort()


def _deliver_to_all(b: Broker, devices: list[Device], command_id: str) -> list[bool]:
    return [
        b.call_soon(lambda d=d: b.mqtt.deliver_command(command(d.device_id, command_id)))
        for d in devices
    ]


def _reachable(b: Broker, count: int) -> Callable[[], bool]:
    def check() -> bool:
        connected = sum(1 for what, _ in list(b.events.seen) if what == "connected")
        gone = sum(1 for what, _ in list(b.events.seen) if what == "disconnected")
        return connected - gone == count

    return check


def test_devices_connecting_at_once_all_get_connack_and_working_subscriptions(
    storm_broker: Broker,
) -> None:
    b = storm_broker
    devices = [Device(f"storm-{n}") for n in range(DEVICES)]
    credentials = {d.device_id: b.provision(d.device_id) for d in devices}

    async def all_connect() -> list[tuple[int, int]]:
        return await asyncio.gather(*(d.connect(b.port, credentials[d.device_id]) for d in devices))

    async def all_receive() -> list[dict[str, Any]]:
        return await asyncio.gather(*(d.command() for d in devices))

    async def scenario() -> None:
        assert await all_connect() == [(0, 1)] * DEVICES
        assert await asyncio.to_thread(wait_until, _reachable(b, DEVICES), timeout=WAIT_S)
        assert b.mqtt.connected_devices == DEVICES
        assert all(await asyncio.to_thread(_deliver_to_all, b, devices, "c-1"))
        assert [m["id"] for m in await all_receive()] == ["c-1"] * DEVICES

        # Every connection lost at once, and every device back at once.
        for d in devices:
            d.drop()
        assert await asyncio.to_thread(wait_until, _reachable(b, 0), timeout=WAIT_S)
        assert await all_connect() == [(0, 1)] * DEVICES
        assert await asyncio.to_thread(wait_until, _reachable(b, DEVICES), timeout=WAIT_S)
        assert all(await asyncio.to_thread(_deliver_to_all, b, devices, "c-2"))
        assert [m["id"] for m in await all_receive()] == ["c-2"] * DEVICES
        # Each device holds exactly its one subscription, none left from before.
        table = b.call_soon(lambda: dict(b.mqtt._broker._subscriptions))  # type: ignore[union-attr]
        assert sorted(table) == sorted(d.topic for d in devices)
        assert all(len(holders) == 1 for holders in table.values())
        for d in devices:
            d.drop()

    asyncio.run(scenario())
    assert wait_until(_reachable(b, 0), timeout=WAIT_S)
    table = b.call_soon(lambda: dict(b.mqtt._broker._subscriptions))  # type: ignore[union-attr]
    assert table == {}  # a clean session's subscriptions end with it


def test_silent_sockets_hold_no_handshake_place(tmp_path: Path) -> None:
    # One place, and sockets that never send a CONNECT (kept open far longer
    # than the device below waits): the device still gets its CONNACK.
    b = Broker(tmp_path / "hub", mqtt_max_handshakes=1, mqtt_connect_timeout_s=300).start()
    try:
        credential = b.provision("after-silence")

        async def scenario() -> tuple[int, int]:
            silent = [await asyncio.open_connection("127.0.0.1", b.port) for _ in range(3)]
            await asyncio.sleep(0.2)  # accepted, each waiting for its CONNECT
            device = Device("after-silence")
            try:
                return await device.connect(b.port, credential)
            finally:
                if device.writer is not None:
                    device.drop()
                for _, writer in silent:
                    writer.transport.abort()

        assert asyncio.run(scenario()) == (0, 1)
    finally:
        b.close()
