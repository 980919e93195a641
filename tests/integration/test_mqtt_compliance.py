"""MQTT 3.1.1 conformance of the embedded broker, driven with raw packets.

Every test runs against the hub's embedded broker twice: with device
authentication and the topic ACL (the default, `auth`) and with
`mqtt_allow_anonymous` (`anonymous`, a plain broker). The packets are written
by hand (`Raw`), so nothing a client library smooths over hides a difference.

The tests of malformed packets run over MQTT over TLS (`auth+tls`) and over
WebSockets (`auth+ws`) too: each listener reads through the same checks, and
these prove it (the certificates are made by `hubapp.certificates`).

Each behaviour tested here was missing from stock amqtt 0.12.1. To see that,
set `HUB_TEST_PLAIN_AMQTT=1`: the same tests then also run against a stock
`amqtt.broker.Broker` (`plain`), where they are expected to fail.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqtt.broker import Broker as StockBroker
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from hubapp import certificates
from tests.integration.test_mqtt_embedded import Broker as HubThread
from tests.support.processes import wait_until

WAIT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
MAX_PACKET = 64 * 1024
AMQTT_VERSION = "0.12.1"  # the version the overrides in bridges/mqtt_* were written for

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 3, 4, 5, 6, 7


# -- raw packets -------------------------------------------------------------------------


def text(value: str | bytes) -> bytes:
    """An MQTT string: two length bytes, then the (possibly invalid) bytes."""
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def packet(first_byte: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([first_byte]) + bytes(encoded) + body


def connect_packet(
    client_id: str | bytes,
    creds: tuple[str, str] | None = None,
    *,
    clean: bool = True,
    keepalive: int = 30,
    will: tuple[str | bytes, bytes, int, bool] | None = None,
    level: int = 4,
    name: str = "MQTT",
    extra_flags: int = 0,
    username: bytes | None = None,
    tail: bytes = b"",
) -> bytes:
    flags = extra_flags | (0x02 if clean else 0)
    payload = text(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += text(topic) + text(message)
    if creds is not None:
        flags |= 0xC0
        payload += text(username if username is not None else creds[0]) + text(creds[1])
    body = text(name) + bytes([level, flags]) + keepalive.to_bytes(2, "big") + payload + tail
    return packet(0x10, body)


def publish_packet(
    topic: str | bytes, payload: bytes, qos: int = 0, pid: int = 0, *, retain: bool = False
) -> bytes:
    body = text(topic) + (pid.to_bytes(2, "big") if qos else b"") + payload
    return packet(0x30 | (qos << 1) | (1 if retain else 0), body)


def ack_packet(kind: int, pid: int) -> bytes:
    return packet((kind << 4) | (0x02 if kind == PUBREL else 0), pid.to_bytes(2, "big"))


def subscribe_packet(pid: int, filters: list[tuple[str | bytes, int]], flags: int = 0x02) -> bytes:
    body = pid.to_bytes(2, "big") + b"".join(text(f) + bytes([q]) for f, q in filters)
    return packet(0x80 | flags, body)


class Received:
    """One packet read from the broker."""

    def __init__(self, first: int, body: bytes) -> None:
        self.type, self.flags, self.body = first >> 4, first & 0x0F, body

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def topic(self) -> str:
        size = int.from_bytes(self.body[:2], "big")
        return self.body[2 : 2 + size].decode()

    @property
    def pid(self) -> int:
        if self.type != PUBLISH:
            return int.from_bytes(self.body[:2], "big")
        start = 2 + int.from_bytes(self.body[:2], "big")
        return int.from_bytes(self.body[start : start + 2], "big")

    @property
    def payload(self) -> bytes:
        start = 2 + int.from_bytes(self.body[:2], "big") + (2 if self.qos else 0)
        return self.body[start:]


class Raw:
    """A TCP connection (over TLS with `tls`) speaking MQTT bytes written by hand."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.sock = sock if tls is None else tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ssl.SSLError as exc:  # the broker closed without a TLS close_notify
            raise EOFError from exc
        if not chunk:
            raise EOFError
        self._buffer += chunk
        return True

    def read(self, timeout: float = WAIT_S) -> Received | None:
        """The next packet, or None if none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buffer) >= 2:
                length, multiplier, i = 0, 1, 1
                while i < len(self._buffer):
                    byte = self._buffer[i]
                    length += (byte & 0x7F) * multiplier
                    multiplier *= 128
                    i += 1
                    if not byte & 0x80:
                        break
                else:
                    i = -1
                if i > 0 and len(self._buffer) >= i + length:
                    first, body = self._buffer[0], self._buffer[i : i + length]
                    self._buffer = self._buffer[i + length :]
                    return Received(first, body)
            if time.monotonic() >= deadline or not self._fill(deadline):
                return None

    def expect(self, kind: int, timeout: float = WAIT_S) -> Received:
        got = self.read(timeout)
        assert got is not None, f"no packet of type {kind} within {timeout} s"
        assert got.type == kind, f"expected packet type {kind}, got {got.type}"
        return got

    def connack(self, timeout: float = WAIT_S) -> tuple[bool, int]:
        got = self.expect(2, timeout)
        return bool(got.body[0] & 0x01), got.body[1]

    def closed_within(self, timeout: float) -> bool:
        """Whether the broker closes the connection within `timeout` (packets
        it sends before that are read and ignored)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._buffer = b""
                self._fill(deadline)
        except (EOFError, ConnectionError):
            return True
        return False

    def close(self) -> None:
        self.sock.close()


class WsRaw(Raw):
    """The same bytes in binary WebSocket frames (path /mqtt, subprotocol mqtt)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.ws = connect(
            f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/mqtt",
            subprotocols=["mqtt"],
            ssl=tls,
            open_timeout=WAIT_S,
            close_timeout=1,
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        try:
            self.ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionError from exc

    def _fill(self, deadline: float) -> bool:
        try:
            chunk = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return False
        except ConnectionClosed as exc:
            raise EOFError from exc
        self._buffer += chunk.encode() if isinstance(chunk, str) else chunk
        return True

    def close(self) -> None:
        self.ws.close()


# -- the brokers under test ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class World:
    """A broker under test and what clients may do on it."""

    name = ""
    port = 0
    #: How clients reach the broker: TLS (a client context) and/or WebSockets.
    tls: ssl.SSLContext | None = None
    websocket = False

    def raw(self) -> Raw:
        """A new raw connection to the broker, over the world's transport."""
        return (WsRaw if self.websocket else Raw)(self.port, self.tls)

    def creds(self, client_id: str) -> tuple[str, str] | None:
        return None

    def sub_topic(self, client_id: str) -> str:
        """A topic `client_id` may subscribe to, and others can publish on."""
        return f"t/{client_id}"

    def pub_topic(self, client_id: str) -> str:
        """A topic `client_id` may publish on."""
        return f"t/{client_id}/out"

    def will_topic(self, client_id: str) -> str:
        return f"t/{client_id}/will"

    def send(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """Publish as another party (an anonymous client here)."""
        raw = self.connected(f"feeder-{time.monotonic_ns()}")
        raw.send(publish_packet(topic, payload, qos, 1 if qos else 0, retain=retain))
        if qos == 1:
            raw.expect(PUBACK)
        elif qos == 2:
            raw.expect(PUBREC)
            raw.send(ack_packet(PUBREL, 1))
            raw.expect(PUBCOMP)
        raw.send(b"\xe0\x00")
        raw.close()

    def retained(self, topic: str) -> bytes | None:
        """The retained message on `topic`, read by a new subscriber."""
        raw = self.connected(f"reader-{time.monotonic_ns()}")
        raw.send(subscribe_packet(1, [(topic, 0)]))
        raw.expect(9)
        got = raw.read(timeout=1.0)
        raw.close()
        return got.payload if got is not None and got.type == PUBLISH else None

    def connected(self, client_id: str, **kwargs: Any) -> Raw:
        raw = self.raw()
        raw.send(connect_packet(client_id, self.creds(client_id), **kwargs))
        _present, code = raw.connack()
        assert code == 0, f"CONNECT refused with {code}"
        return raw

    def close(self) -> None:
        pass


class HubWorld(World):
    def __init__(
        self, data_dir: Path, *, anonymous: bool, transport: str = "tcp", ca: Path | None = None
    ) -> None:
        self.name = "anonymous" if anonymous else "auth"
        listener: dict[str, Any] = {}
        if transport == "tls":
            assert ca is not None
            listener = {
                "mqtt_tls_port": free_port(),
                "tls_cert_file": ca / certificates.HUB_CERT,
                "tls_key_file": ca / certificates.HUB_KEY,
            }
            self.tls = ssl.create_default_context(cafile=str(ca / certificates.CA_CERT))
        elif transport == "ws":
            listener = {"mqtt_ws_port": free_port()}
            self.websocket = True
        self.hub = HubThread(
            data_dir,
            mqtt_allow_anonymous=anonymous,
            mqtt_connect_timeout_s=CONNECT_TIMEOUT_S,
            mqtt_max_packet_bytes=MAX_PACKET,
            **listener,
        ).start()
        port = {"tcp": self.hub.port, "tls": self.hub.mqtt.tls_port, "ws": self.hub.mqtt.ws_port}
        self.port = port[transport] or 0
        self.anonymous = anonymous

    def close(self) -> None:
        self.hub.close()


class AuthWorld(HubWorld):
    """Devices authenticate; each may only use its own topics (hub.topics)."""

    def creds(self, client_id: str) -> tuple[str, str] | None:
        if client_id not in self.hub.registry:
            self.hub.provision(client_id)
        return client_id, self.hub.registry[client_id]

    def sub_topic(self, client_id: str) -> str:
        return f"devices/{client_id}/commands"

    def pub_topic(self, client_id: str) -> str:
        return f"devices/{client_id}/telemetry"

    def will_topic(self, client_id: str) -> str:
        return f"devices/{client_id}/state"

    def send(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        # No device may publish on another's topics: the hub itself does
        # (the command downlink).
        broker = self.hub.mqtt._broker
        assert broker is not None
        if retain:
            self.hub.call(broker.retain_message(None, topic, payload, qos))
        self.hub.call(self.hub.mqtt.publish(topic, payload, qos))

    def retained(self, topic: str) -> bytes | None:
        broker = self.hub.mqtt._broker
        assert broker is not None
        message = broker.retained_messages.get(topic)
        return bytes(message.data) if message is not None else None


class PlainWorld(World):
    """Stock amqtt 0.12.1, anonymous, on its own event loop."""

    name = "plain"

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> StockBroker:
            broker = StockBroker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                    "plugins": {
                        "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                            "allow_anonymous": True
                        }
                    },
                }
            )
            await broker.start()
            return broker

        self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(WAIT_S)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(WAIT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT_S)


WORLDS = ["auth", "anonymous"] + (["plain"] if os.environ.get("HUB_TEST_PLAIN_AMQTT") else [])


#: The tests of malformed packets also run over TLS and WebSockets (authenticated).
EDGE_WORLDS = [*WORLDS, "auth+tls", "auth+ws"]


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("compliance-ca")
    certificates.init_ca(directory)
    return directory


@pytest.fixture(params=WORLDS)
def world(request: pytest.FixtureRequest, tmp_path: Path, test_ca: Path) -> Iterator[World]:
    made: World
    name, _, transport = str(request.param).partition("+")
    if name == "plain":
        made = PlainWorld()
    else:
        cls = AuthWorld if name == "auth" else HubWorld
        made = cls(
            tmp_path / "hub",
            anonymous=name == "anonymous",
            transport=transport or "tcp",
            ca=test_ca,
        )
    yield made
    made.close()


@pytest.fixture
def raws(world: World) -> Iterator[Callable[..., Raw]]:
    opened: list[Raw] = []

    def open_raw() -> Raw:
        raw = world.raw()
        opened.append(raw)
        return raw

    yield open_raw
    for raw in opened:
        raw.close()


def telemetry(seq: int) -> bytes:
    return json.dumps({"seq": seq, "boot": 1, "values": {"n": seq}}).encode()


# -- the pinned amqtt version ---------------------------------------------------------------


def test_amqtt_is_the_version_the_overrides_were_written_for() -> None:
    installed = importlib.metadata.version("amqtt")
    assert installed == AMQTT_VERSION, (
        f"amqtt {installed} is installed, but the modules of bridges/mqtt/ "
        f"override internals of amqtt {AMQTT_VERSION}: re-check each "
        "override (docs/mqtt.md, 'How the embedded broker is built') before changing the pin"
    )


# -- 7. malformed packets close the connection --------------------------------------------

# (name, packet) pairs sent as the first packet of a connection. `C` is filled
# with the world's credentials for the client id "bad".
BAD_CONNECTS: dict[str, Callable[[tuple[str, str] | None], bytes]] = {
    "first packet not CONNECT": lambda c: b"\xc0\x00",
    "client id not UTF-8": lambda c: connect_packet(b"\xff\xfe", c),
    "user name not UTF-8": lambda c: connect_packet("bad", ("x", "y"), username=b"\xc3\x28"),
    "will topic not UTF-8": lambda c: connect_packet("bad", c, will=(b"\xed\xa0\x80", b"x", 0, 0)),
    "empty will topic": lambda c: connect_packet("bad", c, will=("", b"gone", 0, False)),
    "will QoS without will flag": lambda c: connect_packet("bad", c, extra_flags=0x08),
    "will retain without will flag": lambda c: connect_packet("bad", c, extra_flags=0x20),
    "password without user name": lambda c: connect_packet(
        "bad", None, extra_flags=0x40, tail=text("secret")
    ),
    "user name present, flag clear": lambda c: connect_packet("bad", None, tail=text("someone")),
    "reserved flag set": lambda c: connect_packet("bad", c, extra_flags=0x01),
    "protocol name wrong": lambda c: connect_packet("bad", c, name="MQTX"),
}


@pytest.mark.parametrize("case", list(BAD_CONNECTS))
@pytest.mark.parametrize("world", EDGE_WORLDS, indirect=True)
def test_a_malformed_first_packet_closes_the_connection(
    world: World, raws: Callable[..., Raw], case: str
) -> None:
    raw = raws()
    raw.send(BAD_CONNECTS[case](world.creds("bad")))
    assert raw.closed_within(2.0), f"{case}: the connection stayed open"


@pytest.mark.parametrize("level", [3, 5])
@pytest.mark.parametrize("world", EDGE_WORLDS, indirect=True)
def test_an_unsupported_protocol_level_gets_connack_1_then_the_close(
    world: World, raws: Callable[..., Raw], level: int
) -> None:
    raw = raws()
    name = "MQIsdp" if level == 3 else "MQTT"
    body = text(name) + bytes([level, 0x02]) + (30).to_bytes(2, "big")
    # An MQTT 5 CONNECT carries a properties length (0) after the keep-alive.
    body += (b"\x00" if level == 5 else b"") + text("v")
    raw.send(packet(0x10, body))
    assert raw.connack(timeout=2.0) == (False, 1)  # [MQTT-3.1.2-2]
    assert raw.closed_within(2.0)


BAD_PACKETS: dict[str, Callable[[World], bytes]] = {
    "PUBLISH QoS 3": lambda w: packet(0x36, text(w.pub_topic("c")) + b"\x00\x01" + telemetry(1)),
    "PUBLISH topic with +": lambda w: publish_packet(w.pub_topic("c") + "/+", b"{}"),
    "PUBLISH topic with #": lambda w: publish_packet("#", b"{}", qos=1, pid=3),
    "PUBLISH topic not UTF-8": lambda w: publish_packet(b"t/\xc0\xaf", b"{}"),
    "SUBSCRIBE flags 0": lambda w: subscribe_packet(1, [(w.sub_topic("c"), 0)], flags=0),
    "SUBSCRIBE without filter": lambda w: packet(0x82, b"\x00\x01"),
    "SUBSCRIBE QoS 3": lambda w: subscribe_packet(1, [(w.sub_topic("c"), 3)]),
    "SUBSCRIBE filter not UTF-8": lambda w: subscribe_packet(1, [(b"t/\xff", 0)]),
    "UNSUBSCRIBE flags 0": lambda w: packet(0xA0, b"\x00\x01" + text(w.sub_topic("c"))),
    "UNSUBSCRIBE without filter": lambda w: packet(0xA2, b"\x00\x01"),
    "second CONNECT": lambda w: connect_packet("c", w.creds("c")),
}


@pytest.mark.parametrize("case", list(BAD_PACKETS))
@pytest.mark.parametrize("world", EDGE_WORLDS, indirect=True)
def test_a_malformed_packet_closes_the_connection(world: World, case: str) -> None:
    raw = world.connected("c")
    try:
        raw.send(BAD_PACKETS[case](world))
        assert raw.closed_within(2.0), f"{case}: the connection stayed open"
    finally:
        raw.close()


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("world", EDGE_WORLDS, indirect=True)
def test_the_wrong_acknowledgement_type_closes_the_connection(world: World, qos: int) -> None:
    raw = world.connected("c")
    try:
        raw.send(subscribe_packet(1, [(world.sub_topic("c"), qos)]))
        raw.expect(9)
        world.send(world.sub_topic("c"), b"{}", qos)
        message = raw.expect(PUBLISH)
        assert message.qos == qos
        # PUBREC for a QoS 1 message, PUBACK for a QoS 2 one [MQTT-4.8.0-1].
        raw.send(ack_packet(PUBREC if qos == 1 else PUBACK, message.pid))
        assert raw.closed_within(2.0)
    finally:
        raw.close()


# -- 8. connections that never become MQTT are closed --------------------------------------


def test_hundreds_of_bad_or_incomplete_first_packets_are_all_closed(world: World) -> None:
    socks: list[socket.socket] = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", world.port), timeout=WAIT_S)
            # Garbage, a truncated CONNECT, or nothing at all.
            sock.sendall([b"GET / HTTP/1.1\r\n\r\n", b"\x10\x20\x00\x04MQ", b""][i % 3])
            socks.append(sock)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + 4.0
        open_ones = list(socks)
        while open_ones and time.monotonic() < deadline:
            still = []
            for sock in open_ones:
                sock.settimeout(0.01)
                try:
                    if sock.recv(64):
                        still.append(sock)
                except TimeoutError:
                    still.append(sock)
                except ConnectionError:
                    pass
            open_ones = still
        assert not open_ones, f"{len(open_ones)} of 300 connections still open"
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("world", EDGE_WORLDS, indirect=True)
def test_an_oversized_packet_is_refused_from_its_length_field(world: World) -> None:
    raw = world.connected("c")
    try:
        # Announces 10 MB and sends none of it: refused before any is buffered.
        raw.send(b"\x30\x80\xad\xe2\x04" + text(world.pub_topic("c")))
        assert raw.closed_within(2.0)
    finally:
        raw.close()


# -- 5. the newest connection of a client id wins ----------------------------------------------


@pytest.mark.parametrize("clean", [True, False])
def test_a_second_connection_with_the_same_client_id_closes_the_first(
    world: World, clean: bool
) -> None:
    first = world.connected("twin", clean=clean)
    second = world.connected("twin", clean=clean)
    try:
        assert first.closed_within(2.0)  # [MQTT-3.1.4-2]
        second.send(b"\xc0\x00")  # PINGREQ: the new connection works
        second.expect(13)
    finally:
        first.close()
        second.close()


# -- 2. delivery at the lower of the two QoS --------------------------------------------------


def test_messages_are_delivered_at_the_lower_of_publish_and_subscription_qos(
    world: World,
) -> None:
    raw = world.connected("sub")
    try:
        raw.send(subscribe_packet(1, [(world.sub_topic("sub"), 2)]))
        assert raw.expect(9).body[2:] == b"\x02"
        for qos in (0, 1):
            world.send(world.sub_topic("sub"), telemetry(qos), qos)
            got = raw.expect(PUBLISH)
            assert (got.qos, got.payload) == (qos, telemetry(qos))  # [MQTT-3.8.4-6]
            if qos:
                raw.send(ack_packet(PUBACK, got.pid))
        raw.send(subscribe_packet(2, [(world.sub_topic("sub"), 0)]))  # replaces the first
        assert raw.expect(9).body[2:] == b"\x00"
        world.send(world.sub_topic("sub"), telemetry(2), 1)
        assert raw.expect(PUBLISH).qos == 0  # [MQTT-3.8.4-3]
    finally:
        raw.close()


# -- 1. keep-alive ------------------------------------------------------------------------


def test_a_client_silent_for_one_and_a_half_keepalives_is_closed_and_its_will_sent(
    world: World,
) -> None:
    will_topic = world.will_topic("quiet")
    raw = world.connected("quiet", keepalive=2, will=(will_topic, b'{"online": false}', 1, True))
    try:
        started = time.monotonic()
        assert raw.closed_within(6.0), "a silent client was never disconnected"
        # [MQTT-3.1.2-24]: 1.5 x 2 s; 2 x would be 4 s.
        assert 2.9 <= time.monotonic() - started < 3.8
    finally:
        raw.close()
    assert wait_until(lambda: world.retained(will_topic) is not None, timeout=WAIT_S)
    assert world.retained(will_topic) == b'{"online": false}'  # [MQTT-3.1.2-8]


# -- 6. retained messages only for one's own subscriptions -------------------------------------


def test_retained_messages_go_only_to_matching_allowed_subscriptions(world: World) -> None:
    owner = world.connected("owner")
    try:
        owner.send(subscribe_packet(1, [(world.sub_topic("owner"), 1)]))
        owner.expect(9)
        world.send(world.sub_topic("owner"), b'{"kept": 1}', 1, retain=True)
        got = owner.expect(PUBLISH)  # live delivery: not retained [MQTT-3.3.1-9]
        assert not got.retain
        owner.send(ack_packet(PUBACK, got.pid))

        other = world.connected("other")
        try:
            other.send(subscribe_packet(1, [(world.sub_topic("other"), 1)]))
            other.expect(9)
            # Nothing of the owner's filter: the other client never subscribed to it.
            assert other.read(timeout=1.0) is None
        finally:
            other.close()

        again = world.connected("late")
        try:
            again.send(subscribe_packet(1, [(world.sub_topic("owner"), 1)]))
            suback = again.expect(9)
            if suback.body[2:] == b"\x80":  # the ACL refused it: nothing retained either
                assert again.read(timeout=1.0) is None
            else:
                kept = again.expect(PUBLISH)
                assert kept.retain and kept.payload == b'{"kept": 1}'  # [MQTT-3.3.1-6]
        finally:
            again.close()
    finally:
        owner.close()


# -- 3. persistent sessions ---------------------------------------------------------------


def test_a_persistent_session_keeps_messages_and_reports_session_present(world: World) -> None:
    topic = world.sub_topic("keeper")
    # A clean session leaves nothing behind, even when the client is right back.
    clean = world.connected("keeper", clean=True)
    clean.send(b"\xe0\x00")
    clean.close()
    raw = Raw(world.port)
    raw.send(connect_packet("keeper", world.creds("keeper"), clean=False))
    assert raw.connack() == (False, 0)  # [MQTT-3.2.2-3]
    raw.send(subscribe_packet(1, [(topic, 1)]))
    raw.expect(9)
    raw.send(b"\xe0\x00")
    raw.close()
    time.sleep(0.2)

    for seq in range(3):
        world.send(topic, telemetry(seq), 1)

    back = Raw(world.port)
    try:
        back.send(connect_packet("keeper", world.creds("keeper"), clean=False))
        assert back.connack() == (True, 0)  # [MQTT-3.2.2-2]
        for seq in range(3):
            got = back.expect(PUBLISH)  # queued while away [MQTT-3.1.2-5], in order
            assert (got.payload, got.qos, got.retain) == (telemetry(seq), 1, False)
            back.send(ack_packet(PUBACK, got.pid))
        back.send(b"\xe0\x00")
    finally:
        back.close()

    fresh = Raw(world.port)
    try:
        fresh.send(connect_packet("keeper", world.creds("keeper"), clean=True))
        assert fresh.connack() == (False, 0)  # [MQTT-3.2.2-1]
    finally:
        fresh.close()


# -- 4. retransmission and QoS 2 state across a reconnect --------------------------------------


@pytest.mark.parametrize("qos", [1, 2])
def test_unacknowledged_messages_are_sent_again_with_dup_on_reconnect(
    world: World, qos: int
) -> None:
    topic = world.sub_topic("flaky")
    raw = Raw(world.port)
    raw.send(connect_packet("flaky", world.creds("flaky"), clean=False))
    raw.connack()
    raw.send(subscribe_packet(1, [(topic, qos)]))
    raw.expect(9)
    world.send(topic, telemetry(1), qos)
    first = raw.expect(PUBLISH)
    if qos == 2:
        raw.send(ack_packet(PUBREC, first.pid))
        raw.expect(PUBREL)
    raw.close()  # gone without acknowledging (or completing)
    time.sleep(0.3)

    back = Raw(world.port)
    try:
        back.send(connect_packet("flaky", world.creds("flaky"), clean=False))
        assert back.connack() == (True, 0)
        if qos == 1:
            again = back.expect(PUBLISH)  # [MQTT-4.4.0-1]
            assert (again.dup, again.pid, again.payload) == (True, first.pid, telemetry(1))
            back.send(ack_packet(PUBACK, again.pid))
        else:
            assert back.expect(PUBREL).pid == first.pid  # the PUBREL is resent
            back.send(ack_packet(PUBCOMP, first.pid))
        assert back.read(timeout=0.5) is None  # and nothing more
    finally:
        back.close()


def test_qos2_state_survives_a_reconnect(world: World) -> None:
    topic = world.pub_topic("sender")
    raw = Raw(world.port)
    raw.send(connect_packet("sender", world.creds("sender"), clean=False))
    raw.connack()
    raw.send(publish_packet(topic, telemetry(1), 2, 7))
    assert raw.expect(PUBREC).pid == 7
    raw.close()  # before sending PUBREL
    time.sleep(0.3)

    back = Raw(world.port)
    try:
        back.send(connect_packet("sender", world.creds("sender"), clean=False))
        assert back.connack() == (True, 0)
        back.send(ack_packet(PUBREL, 7))
        assert back.expect(PUBCOMP).pid == 7  # [MQTT-4.3.3-2], not a second PUBREC
        # A PUBREL for an identifier no longer known is still completed.
        back.send(ack_packet(PUBREL, 7))
        assert back.expect(PUBCOMP).pid == 7
    finally:
        back.close()


# Not in the "auth" world: there devices cannot publish to each other under the ACL.
@pytest.mark.parametrize("world", [w for w in WORLDS if w != "auth"], indirect=True)
def test_messages_read_before_a_disconnect_are_all_delivered(world: World) -> None:
    sub = world.connected("sink")
    try:
        sub.send(subscribe_packet(1, [(world.sub_topic("sink"), 0)]))
        sub.expect(9)
        burst = world.connected("burst")
        # Acknowledged QoS 1 messages, then DISCONNECT at once: none may be lost.
        burst.send(
            b"".join(
                publish_packet(world.sub_topic("sink"), b"%d" % n, 1, n + 1) for n in range(300)
            )
            + b"\xe0\x00"
        )
        got = [sub.expect(PUBLISH).payload for _ in range(300)]
        assert got == [b"%d" % n for n in range(300)]
        burst.close()
    finally:
        sub.close()
