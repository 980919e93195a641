"""MQTT over WebSockets (ws and wss) on the embedded broker.

The real broker on free ports: paho with `transport="websockets"` and the
`websockets` library's own client for exact frames, against the dispatcher
double of test_mqtt_embedded; one test runs the whole pipeline (RabbitMQ, a
worker, the database) over ws and over wss. Certificates are made in the test
by `hubapp.certificates`, as in test_mqtt_tls.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from hub.errors import ConfigError
from hub.storage import count_rows
from hubapp import certificates
from tests.integration.test_mqtt_embedded import WAIT_S, Broker, Client, acked, telemetry
from tests.integration.test_mqtt_tls import free_port, tls_settings
from tests.support.processes import HubThread, Worker, wait_until


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    certificates.init_ca(directory)
    return directory


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(**overrides: Any) -> Broker:
        b = Broker(tmp_path / f"hub{len(started)}", **{"mqtt_ws_port": free_port(), **overrides})
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        ca: Path | None = None,
        cert: certificates.Issued | None = None,
    ) -> Client:
        c = Client(port, client_id, username, password, websockets=True)
        if ca is not None:
            c.client.tls_set(
                ca_certs=str(ca / certificates.CA_CERT),
                certfile=str(cert.cert) if cert else None,
                keyfile=str(cert.key) if cert else None,
            )
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


Make = Callable[..., Client]
StartBroker = Callable[..., Broker]


def ws_port(b: Broker) -> int:
    port = b.mqtt.ws_port
    assert port is not None
    return port


def wss_settings(ca: Path, **overrides: Any) -> dict[str, Any]:
    return tls_settings(ca, **{"mqtt_tls_port": 0, "mqtt_wss_port": free_port(), **overrides})


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 30)
    body += _utf8(client_id) + _utf8(username) + _utf8(password)
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def raw_ws(port: int, **kwargs: Any) -> ClientConnection:
    """The `websockets` library's client: the frames the test sends are sent as they are."""
    return connect(
        f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], open_timeout=WAIT_S, **kwargs
    )


def closed_by_broker(ws: ClientConnection) -> bool:
    try:
        while True:
            ws.recv(timeout=WAIT_S)
    except ConnectionClosed:
        return True
    except TimeoutError:
        return False


def counted(b: Broker, name: str, reason: str, expected: float = 1) -> bool:
    """The broker counts a refusal just after the client sees its end: wait for it."""
    return wait_until(
        lambda: b.counter(name, transport="mqtt", reason=reason) == expected,
        timeout=WAIT_S,
        interval=0.02,
    )


def errors(b: Broker, reason: str) -> bool:
    return counted(b, "hub_protocol_errors_total", reason)


#: An opening handshake written by hand, for frames no client library would send.
OPENING_REQUEST = (
    b"GET /mqtt HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)


def refused(b: Broker, reason: str) -> bool:
    return counted(b, "hub_connections_refused_total", reason)


# -- ws and wss: paho, the whole pipeline ---------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_qos1_telemetry_over_websockets_is_stored(
    scheme: str,
    worker: Worker,
    running_hub: Callable[..., HubThread],
    provision: Callable[[list[str]], dict[str, str]],
    engine: Engine,
    device_prefix: str,
    ca: Path,
) -> None:
    settings: dict[str, Any] = {"mqtt_ws_port": free_port()}
    if scheme == "wss":
        settings = wss_settings(ca)
    hub = running_hub(mqtt_enabled=True, **settings)
    port = hub.app.mqtt_ws_port if scheme == "ws" else hub.app.mqtt_wss_port
    assert port is not None
    # The status and the heartbeat name the listener.
    assert (f"mqtt-{scheme}", port) in {(li.name, li.port) for li in hub.app.listeners()}
    device_id = f"{device_prefix}{scheme}"
    creds = provision([device_id])
    dev = Client(port, device_id, device_id, creds[device_id], websockets=True)
    if scheme == "wss":
        dev.client.tls_set(ca_certs=str(ca / certificates.CA_CERT))
    try:
        assert not dev.connect().is_failure
        infos = [dev.publish(f"devices/{device_id}/telemetry", telemetry(n)) for n in range(5)]
        assert all(acked(info) for info in infos)
    finally:
        dev.close()
    assert wait_until(lambda: count_rows(engine, device_prefix=device_id) == 5)
    assert hub.counter("hub_messages_acked_total", transport="mqtt") == 5


# -- the same accept path as TCP ----------------------------------------------------------------


def test_a_malformed_packet_in_a_frame_closes_only_that_connection(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    credential = b.provision("dev-1")
    good = clients(ws_port(b), "dev-1", "dev-1", credential)
    assert not good.connect().is_failure
    bad_credential = b.provision("dev-2")

    with raw_ws(ws_port(b)) as bad:
        bad.send(connect_packet("dev-2", "dev-2", bad_credential))
        assert bad.recv(timeout=WAIT_S) == bytes([0x20, 0x02, 0x00, 0x00])
        # A PUBLISH whose topic length runs past the end of the packet.
        bad.send(bytes([0x30, 0x04, 0x00, 0x10, ord("a"), ord("b")]))
        assert closed_by_broker(bad)
        assert bad.close_code == 1002  # the broker's close frame: protocol error

    assert errors(b, "malformed_packet")
    assert acked(good.publish("devices/dev-1/telemetry", telemetry(1)))
    assert [e.seq for e in b.dispatcher.data("dev-1")] == [1]
    assert b.dispatcher.data("dev-2") == []


def test_packets_split_across_frames_and_joined_in_one_are_read(broker: StartBroker) -> None:
    b = broker()
    credential = b.provision("dev-1")
    packet = connect_packet("dev-1", "dev-1", credential)
    with raw_ws(ws_port(b)) as ws:
        # [MQTT-6.0.0-2]: a frame may hold part of a packet, or several packets.
        ws.send(packet[:3])
        ws.send(packet[3:])
        assert ws.recv(timeout=WAIT_S) == bytes([0x20, 0x02, 0x00, 0x00])
        topic = b"devices/dev-1/telemetry"
        payloads = [telemetry(n) for n in (1, 2)]
        publishes = b"".join(
            bytes([0x32, 2 + len(topic) + 2 + len(p)])
            + struct.pack(">H", len(topic))
            + topic
            + struct.pack(">H", n)
            + p
            for n, p in zip((1, 2), payloads, strict=True)
        )
        ws.send(publishes)
        # The two PUBACKs come in one frame or two (the fast path writes a
        # batch's PUBACKs together): read frames until both are in.
        pubacks = b""
        while len(pubacks) < 8:
            frame = ws.recv(timeout=WAIT_S)
            assert isinstance(frame, bytes)
            pubacks += frame
        assert pubacks == bytes([0x40, 0x02, 0x00, 0x01, 0x40, 0x02, 0x00, 0x02])
    assert [e.seq for e in b.dispatcher.data("dev-1")] == [1, 2]


def test_a_text_frame_closes_the_connection(broker: StartBroker) -> None:
    b = broker()
    credential = b.provision("dev-1")
    with raw_ws(ws_port(b)) as ws:
        ws.send(connect_packet("dev-1", "dev-1", credential))
        assert ws.recv(timeout=WAIT_S) == bytes([0x20, 0x02, 0x00, 0x00])
        ws.send("\xc0\x00")  # PINGREQ, but in a text frame [MQTT-6.0.0-1]
        assert closed_by_broker(ws)
    assert errors(b, "malformed_packet")


def test_an_unmasked_frame_closes_the_connection(broker: StartBroker) -> None:
    b = broker()
    credential = b.provision("dev-1")
    with socket.create_connection(("127.0.0.1", ws_port(b)), timeout=WAIT_S) as sock:
        sock.sendall(OPENING_REQUEST)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101 ")
        connect = connect_packet("dev-1", "dev-1", credential)
        # RFC 6455 5.1: a client masks every frame; this one does not.
        sock.sendall(bytes([0x82, len(connect)]) + connect)
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    # A close frame (unmasked, from the server): 1002, protocol error, and why.
    assert rest[0] == 0x88 and rest[2:4] == (1002).to_bytes(2, "big"), rest
    assert errors(b, "malformed_packet")
    assert b.dispatcher.data("dev-1") == []


def test_a_message_larger_than_the_largest_packet_is_refused(broker: StartBroker) -> None:
    b = broker(mqtt_max_packet_bytes=1024)
    credential = b.provision("dev-1")
    with raw_ws(ws_port(b)) as ws:
        ws.send(connect_packet("dev-1", "dev-1", credential))
        assert ws.recv(timeout=WAIT_S) == bytes([0x20, 0x02, 0x00, 0x00])
        ws.send(bytes(4096))
        assert closed_by_broker(ws)
        assert ws.close_code == 1009  # message too big
    assert errors(b, "packet_too_large")


def test_a_bad_credential_over_websockets_is_refused_as_over_tcp(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    b.provision("dev-1")
    over_ws = clients(ws_port(b), "dev-1", "dev-1", "not-the-credential")
    refusal = over_ws.connect()
    assert refusal.is_failure
    over_tcp = Client(b.port, "dev-1", "dev-1", "not-the-credential")
    try:
        assert over_tcp.connect() == refusal
    finally:
        over_tcp.close()
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="bad_credential") == 2


def test_the_acl_applies_over_websockets(broker: StartBroker, clients: Make) -> None:
    b = broker()
    dev = clients(ws_port(b), "dev-1", "dev-1", b.provision("dev-1"))
    assert not dev.connect().is_failure
    [denied] = dev.subscribe("devices/dev-2/commands")
    assert denied.value == 0x80
    [granted] = dev.subscribe("devices/dev-1/commands")
    assert not granted.is_failure


def test_the_acl_file_applies_over_websockets(
    broker: StartBroker, clients: Make, tmp_path: Path
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite TopicA/#\ntopic deny TopicA/secret\n")
    b = broker(mqtt_acl_file=acl, mqtt_allow_anonymous=True)
    c = clients(ws_port(b), "suite")
    assert not c.connect().is_failure
    [denied] = c.subscribe("other/#")
    assert denied.value == 0x80
    assert not c.subscribe("TopicA/#")[0].is_failure
    c.publish("TopicA/secret", b"x")
    c.publish("TopicA/open", b"y")
    assert c.messages.get(timeout=WAIT_S).topic == "TopicA/open"
    assert b.counter("hub_acl_refusals_total", action="subscribe") == 1


def test_the_connection_limit_counts_websocket_clients(broker: StartBroker, clients: Make) -> None:
    b = broker(mqtt_max_connections=1)
    dev = clients(ws_port(b), "dev-1", "dev-1", b.provision("dev-1"))
    assert not dev.connect().is_failure
    # Closed before any byte is read: the WebSocket handshake never starts.
    with pytest.raises((ConnectionClosed, InvalidHandshake, OSError)):
        raw_ws(ws_port(b)).close()
    assert refused(b, "connection_limit")


def test_the_limit_per_address_applies_before_the_websocket_handshake(broker: StartBroker) -> None:
    b = broker(max_connections_per_address=1)
    with raw_ws(ws_port(b)), pytest.raises((ConnectionClosed, InvalidHandshake, OSError)):
        raw_ws(ws_port(b)).close()
    assert refused(b, "per_address_connections")


# -- the opening handshake --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "subprotocols", "status"),
    [("/", ["mqtt"], 404), ("/mqtt", ["mqttv3.1"], 400), ("/mqtt", None, 400)],
)
def test_a_handshake_off_path_or_without_the_mqtt_subprotocol_is_refused(
    broker: StartBroker, path: str, subprotocols: list[str] | None, status: int
) -> None:
    b = broker()
    with pytest.raises(InvalidStatus) as caught:
        connect(f"ws://127.0.0.1:{ws_port(b)}{path}", subprotocols=subprotocols).close()
    assert caught.value.response.status_code == status
    assert refused(b, "ws_handshake")


def test_no_handshake_within_the_connect_timeout_closes_the_connection(
    broker: StartBroker,
) -> None:
    b = broker(mqtt_connect_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", ws_port(b)), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\n")  # and never the rest
        assert sock.recv(1024) == b""
    assert refused(b, "ws_handshake")


def test_frames_sent_before_the_handshake_answer_are_refused(broker: StartBroker) -> None:
    # RFC 6455 4.1: the client waits for the answer. A ping sent early was once
    # answered with a pong ahead of the HTTP answer (found by python -m fuzz mqtt).
    b = broker()
    ping = b"\x89\x82\x00\x00\x00\x00hi"  # masked with the key 0
    with socket.create_connection(("127.0.0.1", ws_port(b)), timeout=WAIT_S) as sock:
        sock.sendall(OPENING_REQUEST + ping)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:40]
    assert refused(b, "ws_handshake")


def test_a_websocket_port_in_use_names_its_setting(tmp_path: Path, ca: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for setting, extra in (("mqtt_ws_port", {}), ("mqtt_wss_port", wss_settings(ca))):
            b = Broker(tmp_path / setting, **{**extra, setting: port})
            try:
                with pytest.raises(ConfigError) as caught:
                    b.start()
                message = str(caught.value)
                assert "\n" not in message
                assert f"{setting} / HUB_{setting.upper()}" in message
            finally:
                b.close()


def test_websockets_turned_off_and_wss_without_a_certificate(broker: StartBroker, ca: Path) -> None:
    assert broker(mqtt_ws_port=0).mqtt.ws_port is None
    assert broker(mqtt_wss_port=free_port()).mqtt.wss_port is None  # no tls_cert_file
    assert broker(**wss_settings(ca, mqtt_wss_port=0)).mqtt.wss_port is None


# -- wss ------------------------------------------------------------------------------------


def test_paho_publishes_over_wss_with_a_credential(
    broker: StartBroker, clients: Make, ca: Path
) -> None:
    b = broker(**wss_settings(ca))
    port = b.mqtt.wss_port
    assert port is not None
    dev = clients(port, "dev-1", "dev-1", b.provision("dev-1"), ca=ca)
    assert not dev.connect().is_failure
    assert acked(dev.publish("devices/dev-1/telemetry", telemetry(1, t=20.5)))
    [envelope] = b.dispatcher.data("dev-1")
    assert (envelope.seq, dict(envelope.payload)) == (1, {"t": 20.5})


def test_mutual_tls_over_wss_names_the_device_without_a_credential(
    broker: StartBroker, clients: Make, ca: Path, tmp_path: Path
) -> None:
    b = broker(**wss_settings(ca, tls_identity="cn", tls_require_certificate=True))
    port = b.mqtt.wss_port
    assert port is not None
    b.provision("dev-1")
    cert = certificates.issue_device(ca, "dev-1", tmp_path / "dev-1")
    dev = clients(port, "dev-1", ca=ca, cert=cert)
    assert not dev.connect().is_failure
    assert acked(dev.publish("devices/dev-1/telemetry", telemetry(1)))
    assert [e.device_id for e in b.dispatcher.data()] == ["dev-1"]
    # The certificate names dev-1: another device's topic stays refused.
    [denied] = dev.subscribe("devices/dev-2/commands")
    assert denied.value == 0x80


def test_a_clear_websocket_on_the_wss_port_fails_the_tls_handshake(
    broker: StartBroker, ca: Path
) -> None:
    b = broker(**wss_settings(ca))
    port = b.mqtt.wss_port
    assert port is not None
    with pytest.raises((ConnectionClosed, InvalidHandshake, OSError, TimeoutError)):
        connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], open_timeout=WAIT_S).close()
    assert refused(b, "tls_handshake")
    context = ssl.create_default_context(cafile=str(ca / certificates.CA_CERT))
    with connect(f"wss://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"], ssl=context) as ws:
        assert ws.subprotocol == "mqtt"
