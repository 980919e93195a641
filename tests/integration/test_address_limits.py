"""Limits per source address (docs/security.md, "Limits per source address") with
real sockets: a flood from 127.0.0.1 is cut at the limits on a TCP listener and
on MQTT while devices connecting from 127.0.0.2 keep being acknowledged, and the
hub's open descriptors return to their baseline.

Real hub (in process, so /proc/self/fd counts its descriptors), real RabbitMQ.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hub.protocol.events import Ack, ConnectionClosed, Nak
from hubapp import certificates
from tests.support.processes import HubThread, wait_until
from tests.support.raw_device import RawDevice

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]

FLOOD = 2000
#: Small limits, so that a flood of 2,000 is cut within a few seconds.
LIMITS = {
    "max_connects_per_address_per_s": 20.0,
    "connect_burst_per_address": 40,
    "max_connections_per_address": 30,
    "auth_failures_per_address": 3,
    "auth_backoff_s": 30.0,
    # Admitted flood sockets stay open (silent) until the test closes them.
    "hello_timeout_s": 60.0,
    "mqtt_connect_timeout_s": 60.0,
}
REASONS = ("per_address_rate", "per_address_connections", "auth_backoff")


def open_sockets() -> int:
    """The process's open socket descriptors (the hub's and the test's own).
    Sockets only: the registry's database files are opened per worker thread
    as look-ups come, bounded by its pool, and have nothing to do with a flood."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


def refused(hub: HubThread, transport: str) -> dict[str, float]:
    return {
        reason: hub.counter("hub_connections_refused_total", transport=transport, reason=reason)
        for reason in REASONS
    }


def flood(port: int, on_every_200: Callable[[], None]) -> list[socket.socket]:
    """FLOOD connections from 127.0.0.1, kept open; `on_every_200` runs meanwhile."""
    opened: list[socket.socket] = []
    for n in range(FLOOD):
        with contextlib.suppress(OSError):  # a refused connect is a cut flood too
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        if n % 200 == 199:
            on_every_200()
    return opened


def closed_count(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the hub has closed."""
    time.sleep(0.5)  # the last refusals reach this side
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            if not sock.recv(1):
                closed += 1
        except BlockingIOError:
            pass  # open, and silent
        except ConnectionError:
            closed += 1
    return closed


# -- MQTT 3.1.1 packets, enough for a device's CONNECT and a QoS 1 PUBLISH ----------------------


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return bytes([first]) + encoded + body


class MqttDevice:
    def __init__(self, port: int, device_id: str, credential: str, source: str) -> None:
        self.device_id = device_id
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        body = _text("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
        body += _text(device_id) + _text(device_id) + _text(credential)
        self.sock.sendall(_packet(0x10, body))
        self.connack = self._read(4)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionError:  # aborted by the hub
                break
            if not chunk:
                break
            data += chunk
        return data

    @property
    def accepted(self) -> bool:
        return self.connack == b"\x20\x02\x00\x00"

    def publish_acked(self, packet_id: int) -> bool:
        topic = f"devices/{self.device_id}/telemetry"
        payload = json.dumps({"n": packet_id}).encode()
        self.sock.sendall(_packet(0x32, _text(topic) + struct.pack("!H", packet_id) + payload))
        return self._read(4) == b"\x40\x02" + struct.pack("!H", packet_id)

    def close(self) -> None:
        self.sock.close()


def test_a_tcp_flood_from_one_address_is_cut_while_devices_from_another_are_acked(
    running_hub: StartHub, provision: Provision, device_prefix: str
) -> None:
    hub = running_hub(**LIMITS)
    credentials = provision([f"{device_prefix}{n}" for n in range(12)])
    devices = iter(credentials.items())
    device_id, credential = next(devices)
    steady = RawDevice(hub.tcp_port, source_address="127.0.0.2")
    assert steady.hello(device_id, credential) == Ack(0)
    steady.telemetry(0, {"n": 0})
    assert steady.next_event(timeout=15) == Ack(0)
    # After the first device and message: the registry's and the broker's
    # connections are open by now, and stay.
    baseline = open_sockets()
    seq = 0
    new_devices: list[RawDevice] = []

    def acked_from_elsewhere() -> None:
        nonlocal seq
        seq += 1
        steady.telemetry(seq, {"n": seq})
        assert steady.next_event(timeout=15) == Ack(seq)
        # A device connecting now, from another address, is accepted too.
        other_id, other_credential = next(devices)
        other = RawDevice(hub.tcp_port, source_address="127.0.0.2")
        new_devices.append(other)
        assert other.hello(other_id, other_credential) == Ack(0)

    flooded = flood(hub.tcp_port, acked_from_elsewhere)
    try:
        counts = refused(hub, "tcp")
        cut = counts["per_address_rate"] + counts["per_address_connections"]
        assert cut >= FLOOD - LIMITS["max_connections_per_address"], counts
        # Never more open from 127.0.0.1 than the limit.
        assert closed_count(flooded) >= FLOOD - LIMITS["max_connections_per_address"]
    finally:
        for sock in flooded:
            sock.close()

    # Failed logins from one address: refused at accept afterwards (auth_backoff).
    for _ in range(LIMITS["auth_failures_per_address"]):
        liar = RawDevice(hub.tcp_port, source_address="127.0.0.3")
        assert isinstance(liar.hello(device_id, "wrong" * 8), Nak)
        liar.close()
    time.sleep(0.2)
    liar = RawDevice(hub.tcp_port, source_address="127.0.0.3")
    assert isinstance(liar.next_event(timeout=5), ConnectionClosed)
    liar.close()
    assert refused(hub, "tcp")["auth_backoff"] == 1
    # The device itself, from its own address, is not slowed down.
    again = RawDevice(hub.tcp_port, source_address="127.0.0.2")
    assert again.hello(device_id, credential) == Ack(0)

    for device in [steady, again, *new_devices]:
        device.close()
    assert wait_until(lambda: hub.counter("hub_connections", transport="tcp") == 0, 15)
    assert wait_until(lambda: open_sockets() <= baseline, 15), (open_sockets(), baseline)


def test_an_mqtt_flood_from_one_address_is_cut_while_devices_from_another_are_acked(
    running_hub: StartHub, provision: Provision, device_prefix: str
) -> None:
    hub = running_hub(mqtt_enabled=True, **LIMITS)
    credentials = provision([f"{device_prefix}m{n}" for n in range(12)])
    devices = iter(credentials.items())
    device_id, credential = next(devices)
    steady = MqttDevice(hub.mqtt_port, device_id, credential, "127.0.0.2")
    assert steady.accepted, steady.connack
    assert steady.publish_acked(1000)
    baseline = open_sockets()  # as above: after the first device and message
    packet_id = 0
    new_devices: list[MqttDevice] = []

    def acked_from_elsewhere() -> None:
        nonlocal packet_id
        packet_id += 1
        assert steady.publish_acked(packet_id)
        other = MqttDevice(hub.mqtt_port, *next(devices), "127.0.0.2")
        new_devices.append(other)
        assert other.accepted, other.connack

    flooded = flood(hub.mqtt_port, acked_from_elsewhere)
    try:
        counts = refused(hub, "mqtt")
        cut = counts["per_address_rate"] + counts["per_address_connections"]
        assert cut >= FLOOD - LIMITS["max_connections_per_address"], counts
        assert closed_count(flooded) >= FLOOD - LIMITS["max_connections_per_address"]
    finally:
        for sock in flooded:
            sock.close()

    for _ in range(LIMITS["auth_failures_per_address"]):
        liar = MqttDevice(hub.mqtt_port, device_id, "wrong" * 8, "127.0.0.3")
        assert not liar.accepted
        liar.close()
    time.sleep(0.2)
    liar = MqttDevice(hub.mqtt_port, device_id, "wrong" * 8, "127.0.0.3")
    assert liar.connack == b""  # closed at accept, before any CONNACK
    liar.close()
    assert refused(hub, "mqtt")["auth_backoff"] == 1

    for device in [steady, *new_devices]:
        device.close()
    assert wait_until(lambda: open_sockets() <= baseline, 15), (open_sockets(), baseline)


def test_on_a_tls_listener_the_address_is_refused_before_any_handshake(
    running_hub: StartHub, tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    certificates.init_ca(ca)
    hub = running_hub(
        tcp_listeners=({"port": 0, "codec": "native", "tls": True},),
        tls_cert_file=ca / certificates.HUB_CERT,
        tls_key_file=ca / certificates.HUB_KEY,
        max_connections_per_address=2,
        max_connects_per_address_per_s=0,
    )
    server = hub.app.tcp_servers[0]
    admitted = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in "ab"]
    assert wait_until(lambda: hub.call_soon(lambda: server.handshakes_in_progress) == 2)
    beyond = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert closed_count([beyond]) == 1
    assert refused(hub, "tcp")["per_address_connections"] == 1
    assert hub.call_soon(lambda: server.handshakes_in_progress) == 2  # none started for it
    for sock in [*admitted, beyond]:
        sock.close()
    # A failed handshake gives its address's place back.
    assert wait_until(
        lambda: (
            hub.counter("hub_connections_refused_total", transport="tcp", reason="tls_handshake")
            == 2
        ),
        10,
    )
    again = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert wait_until(lambda: hub.call_soon(lambda: server.handshakes_in_progress) == 1)
    again.close()
    assert refused(hub, "tcp")["per_address_connections"] == 1
