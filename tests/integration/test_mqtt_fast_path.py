"""The fast path of device uplink (docs/mqtt.md, "The fast path") beside amqtt's slow path.

A device's publish on its own uplink topic goes from the packet reader straight
to the dispatcher while nobody subscribes to the topic, and through amqtt
(which delivers it) while somebody does. These tests make a subscriber come
and go while one device publishes, and check that the PUBACKs of that one
connection stay in the order of its PUBLISHes, that nothing is lost, and that
the subscriber gets exactly what was published while it was subscribed, at
the right QoS.

The first test runs the embedded broker with a dispatcher double that holds
every future, so that fast and slow messages are pending together on one
connection for certain. The second runs the whole hub against RabbitMQ, a
real worker and the database, with a subscriber joining and leaving a
stream in full flow.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine

from hub.storage import count_rows
from tests.integration.test_mqtt_embedded import Broker, StartBroker, broker  # noqa: F401
from tests.support.processes import HubThread, Worker, wait_until
from tests.support.raw_mqtt import read_packet

WAIT_S = 20.0
StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]


# -- a raw MQTT 3.1.1 client with a reader thread ------------------------------------------


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    out, n = bytearray([first]), len(body)
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


@dataclass
class Delivery:
    """A PUBLISH the broker sent to a subscriber."""

    topic: str
    qos: int
    seq: int
    retain: bool


@dataclass
class RawClient:
    """A hand-driven MQTT connection: writes from the test, reads in a thread."""

    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 60
    pubacks: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    other: queue.Queue[tuple[int, bytes]] = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        self._lock = threading.Lock()
        flags = 0x02 | (0xC0 if self.username is not None else 0)
        body = _text("MQTT") + bytes([4, flags]) + struct.pack(">H", self.keepalive_s)
        body += _text(self.client_id)
        if self.username is not None:
            body += _text(self.username) + _text(self.password or "")
        self.sock.sendall(_packet(0x10, body))
        kind, connack = self._read()
        assert kind == 0x20 and connack[1] == 0, f"CONNACK refused: {connack!r}"
        self._thread = threading.Thread(target=self._read_loop, daemon=True)
        self._thread.start()

    def _read(self) -> tuple[int, bytes]:
        return read_packet(self.sock)

    def _read_loop(self) -> None:
        try:
            while True:
                first, body = self._read()
                kind = first >> 4
                if kind == 4:  # PUBACK
                    self.pubacks.append(struct.unpack(">H", body[:2])[0])
                elif kind == 3:  # PUBLISH to this subscriber
                    qos = (first >> 1) & 3
                    size = struct.unpack(">H", body[:2])[0]
                    at = 2 + size + (2 if qos else 0)
                    payload = json.loads(body[at:])
                    self.deliveries.append(
                        Delivery(body[2 : 2 + size].decode(), qos, payload["seq"], bool(first & 1))
                    )
                    if qos == 1:
                        self.send(_packet(0x40, body[2 + size : 4 + size]))
                else:
                    self.other.put((kind, body))
        except (ConnectionError, OSError):
            self.closed.set()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int = 0) -> None:
        header = 0x30 | (qos << 1)
        variable = _text(topic) + (struct.pack(">H", packet_id) if qos else b"")
        self.send(_packet(header, variable + payload))

    def expect(self, kind: int) -> bytes:
        got, body = self.other.get(timeout=WAIT_S)
        assert got == kind, f"expected packet type {kind}, got {got}"
        return body

    def subscribe(self, topic_filter: str, qos: int, packet_id: int = 1) -> int:
        body = struct.pack(">H", packet_id) + _text(topic_filter) + bytes([qos])
        self.send(_packet(0x82, body))
        return self.expect(9)[2]  # SUBACK: the granted QoS

    def unsubscribe(self, topic_filter: str, packet_id: int = 2) -> None:
        self.send(_packet(0xA2, struct.pack(">H", packet_id) + _text(topic_filter)))
        self.expect(11)  # UNSUBACK

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(_packet(0xE0, b""))
        self.sock.close()


@pytest.fixture
def raw_clients() -> Iterator[Callable[..., RawClient]]:
    made: list[RawClient] = []

    def make(*args: object, **kwargs: object) -> RawClient:
        client = RawClient(*args, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def release_newest_first(b: Broker) -> None:
    """Resolve every held future, the newest first: later messages become
    durable before earlier ones, and their PUBACKs must still wait."""

    def resolve() -> None:
        b.dispatcher.hold_all = False
        held, b.dispatcher._held = b.dispatcher._held, []
        for future in reversed(held):
            if not future.done():
                future.set_result(None)

    b.call_soon(resolve)


def telemetry(seq: int) -> bytes:
    return json.dumps({"seq": seq, "boot": 7, "values": {"n": seq}}).encode()


# -- fast and slow messages pending together on one connection ------------------------------


def test_fast_and_slow_pubacks_of_one_connection_leave_in_order_and_subscribers_get_their_share(
    broker: StartBroker,  # noqa: F811
    raw_clients: Callable[..., RawClient],
) -> None:
    b = broker(mqtt_allow_anonymous=True)
    b.dispatcher.hold_all = True
    credential = b.provision("dev-1")
    dev = raw_clients(b.port, "dev-1", "dev-1", credential)
    watcher = raw_clients(b.port, "watcher")
    topic = "devices/dev-1/telemetry"

    # Even numbers are published at QoS 0, odd ones at QoS 1.
    def publish(seqs: range) -> None:
        for seq in seqs:
            qos = seq % 2
            dev.publish(topic, telemetry(seq), qos, packet_id=seq if qos else 0)
        # Each batch is read before the subscription changes.
        assert wait_until(lambda: len(b.dispatcher.data("dev-1")) == seqs[-1], timeout=WAIT_S)

    # Held: 1-10 while nobody subscribes (the fast path), then 11-20 with a QoS 1
    # subscriber (amqtt's path), all waiting to become durable together.
    publish(range(1, 11))
    assert watcher.subscribe(topic, 1) == 1
    publish(range(11, 21))
    assert dev.pubacks == []  # nothing is durable yet, fast or slow
    release_newest_first(b)
    assert wait_until(lambda: len(dev.pubacks) == 10, timeout=WAIT_S), dev.pubacks
    assert dev.pubacks == list(range(1, 21, 2))  # fast, then slow: in the PUBLISHes' order
    # Delivered once durable, at the lower of the PUBLISH's QoS and the subscription's.
    assert wait_until(lambda: len(watcher.deliveries) == 10, timeout=WAIT_S)
    # In order per QoS [MQTT-4.6.0-6]; a QoS 0 message does not wait for durability.
    for qos in (0, 1):
        assert [d.seq for d in watcher.deliveries if d.qos == qos] == list(
            range(11 + 1 - qos, 21, 2)
        )
    assert not any(d.retain for d in watcher.deliveries)  # live deliveries [MQTT-3.3.1-9]

    # Held again: 21-30 with a QoS 0 subscriber (amqtt's path), then it leaves,
    # then 31-40 on the fast path; the slow PUBACKs hold the fast ones back.
    b.dispatcher.hold_all = True
    assert watcher.subscribe(topic, 0, packet_id=3) == 0  # replaces the QoS [MQTT-3.8.4-3]
    publish(range(21, 31))
    watcher.unsubscribe(topic, packet_id=4)
    publish(range(31, 41))
    release_newest_first(b)
    assert wait_until(lambda: len(dev.pubacks) == 20, timeout=WAIT_S), dev.pubacks
    assert dev.pubacks == list(range(1, 41, 2))
    assert [e.seq for e in b.dispatcher.data("dev-1")] == list(range(1, 41))
    time.sleep(0.3)  # anything more would be a delivery of the fast path's messages
    later = [(d.seq, d.qos) for d in watcher.deliveries[10:]]
    # Its QoS 0 messages went out at once; a QoS 1 one is delivered when durable,
    # and that was after the subscriber had left (docs/mqtt.md, "QoS and acknowledgement").
    assert later == [(s, 0) for s in range(22, 31, 2)]
    assert b.counter("hub_messages_acked_total", transport="mqtt") == 20


def test_a_retained_publish_is_kept_for_later_subscribers(
    broker: StartBroker,  # noqa: F811
    raw_clients: Callable[..., RawClient],
) -> None:
    b = broker(mqtt_allow_anonymous=True)
    credential = b.provision("dev-1")
    dev = raw_clients(b.port, "dev-1", "dev-1", credential)
    topic = "devices/dev-1/state"

    dev.publish(topic, telemetry(1), 1, packet_id=1)  # no subscriber: the fast path
    dev.send(_packet(0x33, _text(topic) + struct.pack(">H", 2) + telemetry(2)))  # retained
    assert wait_until(lambda: dev.pubacks == [1, 2], timeout=WAIT_S)

    watcher = raw_clients(b.port, "watcher")
    assert watcher.subscribe(topic, 1) == 1
    assert wait_until(lambda: len(watcher.deliveries) == 1, timeout=WAIT_S)
    assert watcher.deliveries[0].seq == 2 and watcher.deliveries[0].retain
    assert [e.seq for e in b.dispatcher.data("dev-1")] == [1, 2]


def test_a_taken_over_connections_pending_pubacks_go_nowhere(
    broker: StartBroker,  # noqa: F811
    raw_clients: Callable[..., RawClient],
) -> None:
    b = broker()
    b.dispatcher.hold_all = True
    credential = b.provision("dev-1")
    old = raw_clients(b.port, "dev-1", "dev-1", credential)
    topic = "devices/dev-1/telemetry"
    for seq in (1, 2, 3):
        old.publish(topic, telemetry(seq), 1, packet_id=seq)
    assert wait_until(lambda: len(b.dispatcher.data("dev-1")) == 3, timeout=WAIT_S)

    new = raw_clients(b.port, "dev-1", "dev-1", credential)  # the same client id
    assert old.closed.wait(WAIT_S)  # [MQTT-3.1.4-2]
    release_newest_first(b)
    new.publish(topic, telemetry(4), 1, packet_id=1)  # the id 1 again, a new message
    assert wait_until(lambda: new.pubacks == [1], timeout=WAIT_S)
    time.sleep(0.3)  # anything more would be an old connection's PUBACK on the new one
    assert new.pubacks == [1] and old.pubacks == []
    # Still made durable, unacknowledged: the device sends them again (seq: stored once).
    assert [e.seq for e in b.dispatcher.data("dev-1")] == [1, 2, 3, 4]


def test_fast_path_publishes_count_as_activity_for_the_keepalive(
    broker: StartBroker,  # noqa: F811
    raw_clients: Callable[..., RawClient],
) -> None:
    b = broker()
    credential = b.provision("dev-1")
    dev = raw_clients(b.port, "dev-1", "dev-1", credential, keepalive_s=1)
    topic = "devices/dev-1/telemetry"
    # 3 s of publishes 0.4 s apart and no PINGREQ: twice the 1.5 s allowed for
    # silence [MQTT-3.1.2-24], never silent that long.
    for seq in range(1, 9):
        dev.publish(topic, telemetry(seq), seq % 2, packet_id=seq)
        time.sleep(0.4)
    assert wait_until(lambda: len(dev.pubacks) == 4, timeout=WAIT_S)
    assert not dev.closed.is_set()
    assert b.counter("hub_protocol_errors_total", transport="mqtt", reason="keepalive_timeout") == 0
    # Silent from now on: closed after one and a half keep-alives.
    assert dev.closed.wait(WAIT_S)
    assert b.counter("hub_protocol_errors_total", transport="mqtt", reason="keepalive_timeout") == 1
    assert [e.seq for e in b.dispatcher.data("dev-1")] == list(range(1, 9))


# -- the whole pipeline, a subscriber joining and leaving a stream in full flow --------------


class Stream(threading.Thread):
    """A device publishing `count` messages with `window` QoS 1 ones unacknowledged;
    every third message is QoS 0. Records when each was sent and acknowledged."""

    def __init__(self, device: RawClient, topic: str, count: int, window: int) -> None:
        super().__init__(daemon=True)
        self.device, self.topic, self.count, self.window = device, topic, count, window
        self.sent_at: dict[int, float] = {}
        self.qos: dict[int, int] = {}
        self.error: BaseException | None = None
        #: Cleared by the test to stop the stream for a moment (`stopped_after`).
        self.go = threading.Event()
        self.go.set()
        self.stopped = threading.Event()
        self.stopped_after = 0

    def run(self) -> None:
        try:
            sent_qos1 = 0
            for seq in range(1, self.count + 1):
                if not self.go.is_set():
                    self.stopped_after = seq - 1
                    self.stopped.set()
                    self.go.wait()
                qos = 0 if seq % 3 == 0 else 1
                while sent_qos1 - len(self.device.pubacks) >= self.window:
                    if self.device.closed.is_set():
                        raise ConnectionError("the hub closed the device's connection")
                    time.sleep(0.0005)
                self.qos[seq] = qos
                sent_qos1 += qos
                self.sent_at[seq] = time.monotonic()
                self.device.publish(self.topic, telemetry(seq), qos, packet_id=seq if qos else 0)
                if seq % 50 == 0:
                    time.sleep(0.002)  # a stream, not one burst
        except BaseException as exc:
            self.error = exc


@pytest.mark.integration
def test_a_subscriber_joining_and_leaving_mid_stream_gets_exactly_its_share_and_nothing_is_lost(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
    raw_clients: Callable[..., RawClient],
) -> None:
    hub = running_hub(mqtt_enabled=True, mqtt_allow_anonymous=True)
    device_id = f"{device_prefix}dev"
    creds = provision([device_id])
    topic = f"devices/{device_id}/telemetry"
    dev = raw_clients(hub.mqtt_port, device_id, device_id, creds[device_id])
    watcher = raw_clients(hub.mqtt_port, f"{device_prefix}watcher")
    count = 3000
    stream = Stream(dev, topic, count, window=64)
    stream.start()

    # Subscribes while the stream is in full flow: fast-path messages are still
    # waiting for their PUBACKs when the first slow ones come.
    assert wait_until(lambda: len(dev.pubacks) >= 300, timeout=WAIT_S)
    acked_before_subscribe = set(dev.pubacks)
    assert watcher.subscribe(topic, 1) == 1
    suback_at = time.monotonic()
    at_suback = len(dev.pubacks)
    assert wait_until(lambda: len(dev.pubacks) >= at_suback + 500, timeout=WAIT_S)
    # Leaves with nothing in flight: amqtt delivers a QoS 1 message once it is
    # durable, so one still waiting then would go to nobody.
    stream.go.clear()
    assert stream.stopped.wait(WAIT_S)
    last = stream.stopped_after
    sent_qos1 = sum(1 for seq in range(1, last + 1) if stream.qos[seq] == 1)
    assert wait_until(lambda: len(dev.pubacks) == sent_qos1, timeout=WAIT_S)
    assert wait_until(lambda: last in {d.seq for d in watcher.deliveries}, timeout=WAIT_S)
    watcher.unsubscribe(topic)
    stream.go.set()
    stream.join(WAIT_S * 3)
    assert stream.error is None and not stream.is_alive()

    qos1 = [seq for seq in range(1, count + 1) if stream.qos[seq] == 1]
    assert wait_until(lambda: len(dev.pubacks) == len(qos1), timeout=WAIT_S)
    assert dev.pubacks == qos1  # one connection's PUBACKs, in order, none missing
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= count)
    time.sleep(1)  # anything more would be a duplicate
    assert count_rows(engine, device_prefix=device_prefix) == count

    got = sorted(d.seq for d in watcher.deliveries)
    # Exactly one run: from about the SUBSCRIBE to the last message before leaving.
    assert got == list(range(got[0], last + 1))
    assert got[0] <= min(s for s, t in stream.sent_at.items() if t > suback_at)
    assert not acked_before_subscribe & set(got)
    for qos in (0, 1):  # in order per QoS [MQTT-4.6.0-6]
        of_qos = [d.seq for d in watcher.deliveries if d.qos == qos]
        assert of_qos == sorted(of_qos)
    # At the lower of the PUBLISH's QoS and the subscription's (1) [MQTT-3.8.4-6].
    assert all(d.qos == stream.qos[d.seq] for d in watcher.deliveries)
    assert all(d.topic == topic and not d.retain for d in watcher.deliveries)
