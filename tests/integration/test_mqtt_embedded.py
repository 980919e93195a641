"""The embedded MQTT broker: authentication, ACL, payloads and when PUBACK is sent.

The first part runs the real embedded broker on a free port with a dispatcher
double whose futures the test resolves, so it can watch PUBACK timing. The
second part (marked integration) runs the whole hub against RabbitMQ, a real
worker and the database.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from bridges.backpressure import Room
from bridges.mqtt.broker import EmbeddedMqtt
from firmware_sim.faults import DelayWrites, SplitRandomly, chain
from firmware_sim.fleet import FleetOptions, run_fleet
from hub.commands import PendingCommand
from hub.envelope import Envelope, Kind
from hub.errors import ConfigError, DispatchError
from hub.metrics import Metrics
from hub.registry import CredentialCache, hash_credential
from hub.storage import count_rows
from hub.topics import command_message, command_topic
from tests.support.processes import HubThread, Worker, make_test_settings, wait_until

T = TypeVar("T")
WAIT_S = 10.0


# -- doubles and helpers ------------------------------------------------------------


class HeldDispatcher:
    """A dispatcher double: records envelopes; resolves futures at once unless held."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.envelopes: list[Envelope] = []
        self.hold_devices: set[str] = set()
        self.hold_all = False
        self.fail = False
        self._held: list[asyncio.Future[None]] = []
        self.room = Room(1_000_000)  # never full: these tests hold futures, not the room

    def submit(self, envelope: Envelope) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self.envelopes.append(envelope)
        if self.fail:
            future.set_exception(DispatchError("the hub is shutting down"))
        elif self.hold_all or envelope.device_id in self.hold_devices:
            self._held.append(future)
        else:
            future.set_result(None)
        return future

    def submit_batched(self, envelope: Envelope) -> asyncio.Future[None]:
        return self.submit(envelope)  # a future per envelope: held one by one

    def release(self) -> None:
        def resolve() -> None:
            self.hold_all = False
            self.hold_devices.clear()
            held, self._held = self._held, []
            for future in held:
                if not future.done():
                    future.set_result(None)

        self.loop.call_soon_threadsafe(resolve)

    def data(self, device_id: str | None = None) -> list[Envelope]:
        return [
            e
            for e in list(self.envelopes)
            if e.kind is not Kind.PRESENCE and (device_id is None or e.device_id == device_id)
        ]


class Events:
    """Records what the downlink would be told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def device_connected(self, device_id: str, transport: str) -> None:
        self.seen.append(("connected", f"{device_id}/{transport}"))

    def device_disconnected(self, device_id: str) -> None:
        self.seen.append(("disconnected", device_id))


class Broker:
    """An EmbeddedMqtt on a background event loop, with an in-memory registry."""

    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.settings = make_test_settings(data_dir, mqtt_enabled=True, **overrides)
        self.metrics = Metrics()
        self.dispatcher = HeldDispatcher(self.loop)
        self.credentials = CredentialCache()
        self.registry: dict[str, str] = {}  # what the database would hold
        self.refreshed: list[str] = []
        self.events = Events()
        self.mqtt = EmbeddedMqtt(
            self.settings,
            self.dispatcher,
            self.credentials,
            self._refresh,
            self.metrics,
            events=self.events,
        )

    async def _refresh(self, device_id: str) -> None:
        self.refreshed.append(device_id)
        if device_id in self.registry:
            self.credentials.update({device_id: hash_credential(self.registry[device_id])})

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def call_soon(self, func: Callable[[], T]) -> T:
        async def run() -> T:
            return func()

        return self.call(run())

    def start(self) -> Broker:
        self.call(self.mqtt.start())
        return self

    def provision(self, device_id: str, *, cached: bool = True) -> str:
        credential = f"secret-of-{device_id}"
        self.registry[device_id] = credential
        if cached:
            self.credentials.update({device_id: hash_credential(credential)})
        return credential

    @property
    def port(self) -> int:
        return self.mqtt.port

    def counter(self, name: str, **labels: str) -> float:
        return float(self.metrics.registry.get_sample_value(name, labels) or 0.0)

    def close(self) -> None:
        try:
            self.call(self.mqtt.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT_S)
            self.loop.close()


class Client:
    """A paho client in its own network thread, with blocking helpers."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        clean_session: bool = True,
        websockets: bool = False,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=clean_session,
            transport="websockets" if websockets else "tcp",
        )
        if websockets:
            self.client.ws_set_options(path="/mqtt")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: ReasonCode | None = None
        self.connack_event = threading.Event()
        self.disconnected = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.acked_mids: list[int] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.acked_mids.append(mid)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self.connack_event.set()
        if reason.is_failure:
            # paho's thread would otherwise reconnect and be refused again.
            self.client.disconnect()

    def _on_disconnect(self, *_args: Any) -> None:
        self.disconnected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self.subacks[mid] = codes

    def connect(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.connack_event.wait(WAIT_S), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        return info

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[ReasonCode]:
        result, mid = self.client.subscribe(topic_filter, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert wait_until(lambda: mid in self.subacks, timeout=WAIT_S, interval=0.02)
        return self.subacks[mid]

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()


def telemetry(seq: int, **values: float) -> bytes:
    return json.dumps({"seq": seq, "boot": 1, "values": values or {"n": seq}}).encode()


def acked(info: mqtt.MQTTMessageInfo, timeout: float = WAIT_S) -> bool:
    return wait_until(info.is_published, timeout=timeout, interval=0.02)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(**overrides: Any) -> Broker:
        b = Broker(tmp_path / f"hub{len(started)}", **overrides)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        c = Client(*args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


Make = Callable[..., Client]
StartBroker = Callable[..., Broker]


def device(b: Broker, make: Make, device_id: str, **kwargs: Any) -> Client:
    """A provisioned device, connected."""
    credential = b.provision(device_id)
    c = make(b.port, device_id, device_id, credential, **kwargs)
    assert not c.connect().is_failure
    return c


# -- acknowledgement --------------------------------------------------------------------


def test_puback_waits_until_the_envelope_is_durable(broker: StartBroker, clients: Make) -> None:
    b = broker()
    b.dispatcher.hold_all = True
    dev = device(b, clients, "dev-1")

    info = dev.publish("devices/dev-1/telemetry", telemetry(7, t=21.5))
    assert wait_until(lambda: len(b.dispatcher.data()) == 1, timeout=WAIT_S)
    time.sleep(0.5)
    assert not info.is_published(), "PUBACK before the dispatcher's future resolved"
    assert b.counter("hub_messages_acked_total", transport="mqtt") == 0

    b.dispatcher.release()
    assert acked(info)
    assert b.counter("hub_messages_acked_total", transport="mqtt") == 1
    envelope = b.dispatcher.data()[0]
    assert (envelope.device_id, envelope.kind, envelope.seq) == ("dev-1", Kind.TELEMETRY, 7)
    assert dict(envelope.payload) == {"t": 21.5}
    assert (envelope.transport, envelope.protocol) == ("mqtt", "mqtt")


def test_one_slow_device_holds_back_only_its_own_pubacks_in_order(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    slow, fast = device(b, clients, "slow"), device(b, clients, "fast")
    b.dispatcher.hold_devices.add("slow")

    slow_infos = [slow.publish("devices/slow/telemetry", telemetry(n)) for n in range(1, 4)]
    fast_info = fast.publish("devices/fast/events", telemetry(1))
    assert acked(fast_info)
    assert not any(i.is_published() for i in slow_infos)

    b.dispatcher.release()
    assert all(acked(i) for i in slow_infos)
    assert slow.acked_mids == [i.mid for i in slow_infos]


def test_no_puback_when_the_hub_cannot_make_it_durable(broker: StartBroker, clients: Make) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")
    b.dispatcher.fail = True

    info = dev.publish("devices/dev-1/telemetry", telemetry(1))
    assert wait_until(lambda: len(b.dispatcher.data()) == 1, timeout=WAIT_S)
    time.sleep(0.5)
    assert not info.is_published()
    assert dev.client.is_connected()


def test_a_connection_with_too_many_pending_messages_is_not_read(
    broker: StartBroker, clients: Make
) -> None:
    b = broker(max_inflight_per_connection=2)
    b.dispatcher.hold_all = True
    dev = device(b, clients, "dev-1")

    infos = [dev.publish("devices/dev-1/telemetry", telemetry(n)) for n in range(1, 6)]
    time.sleep(0.5)
    assert len(b.dispatcher.data()) == 2  # the rest waits in the socket

    b.dispatcher.release()
    assert all(acked(i) for i in infos)
    assert [e.seq for e in b.dispatcher.data()] == [1, 2, 3, 4, 5]


def test_qos0_is_bridged_without_acknowledgement(broker: StartBroker, clients: Make) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")
    dev.publish("devices/dev-1/state", b'{"on": true}', qos=0)
    assert wait_until(lambda: len(b.dispatcher.data()) == 1, timeout=WAIT_S)
    assert b.dispatcher.data()[0].kind is Kind.STATE
    assert b.counter("hub_messages_acked_total", transport="mqtt") == 0


# -- authentication ------------------------------------------------------------------


def test_wrong_password_is_refused(broker: StartBroker, clients: Make) -> None:
    b = broker()
    b.provision("dev-1")
    reason = clients(b.port, "dev-1", "dev-1", "not-the-credential").connect()
    assert reason.is_failure
    assert reason.value == 134  # MQTT 3.1.1 return code 4: bad user name or password
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="bad_credential") == 1
    assert b.mqtt.connected_devices == 0


def test_unknown_device_is_looked_up_once_then_refused(broker: StartBroker, clients: Make) -> None:
    b = broker()
    reason = clients(b.port, "ghost", "ghost", "whatever").connect()
    assert reason.is_failure
    assert b.refreshed == ["ghost"]
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="unknown_device") == 1


def test_device_provisioned_after_start_is_found(broker: StartBroker, clients: Make) -> None:
    b = broker()
    credential = b.provision("late", cached=False)
    assert not clients(b.port, "late", "late", credential).connect().is_failure
    assert b.refreshed == ["late"]
    assert b.mqtt.connected_devices == 1


def test_anonymous_is_refused_by_default(broker: StartBroker, clients: Make) -> None:
    b = broker()
    reason = clients(b.port, "anon").connect()
    assert reason.is_failure
    assert reason.value == 135  # not authorized
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="anonymous") == 1


def test_a_device_cannot_take_over_another_devices_persistent_session(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    owner = device(b, clients, "owner", clean_session=False)
    assert not owner.subscribe(command_topic("devices", "owner"))[0].is_failure
    owner.close()
    assert wait_until(lambda: b.mqtt.connected_devices == 0, timeout=WAIT_S)

    credential = b.provision("thief")
    reason = clients(b.port, "owner", "thief", credential, clean_session=False).connect()
    assert reason.is_failure
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="client_id_in_use") == 1

    again = clients(b.port, "owner", "owner", b.registry["owner"], clean_session=False)
    assert not again.connect().is_failure


def test_a_refused_connect_with_a_devices_client_id_leaves_that_device_alone(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")
    dev.subscribe(command_topic("devices", "dev-1"))
    assert wait_until(lambda: b.events.seen == [("connected", "dev-1/mqtt")], timeout=WAIT_S)

    impostor = clients(b.port, "dev-1", "dev-1", "wrong")
    assert impostor.connect().is_failure
    impostor.close()

    # Still connected, still subscribed, still reachable for commands.
    assert dev.client.is_connected()
    assert b.call_soon(lambda: b.mqtt.deliver_command(command("dev-1")))
    assert json.loads(dev.messages.get(timeout=WAIT_S).payload)["id"] == "c-1"
    assert acked(dev.publish("devices/dev-1/telemetry", telemetry(1)))
    assert b.mqtt.connected_devices == 1


def test_a_refused_connect_leaves_a_persistent_session_and_its_connection_alone(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    dev = device(b, clients, "dev-1", clean_session=False)
    dev.subscribe(command_topic("devices", "dev-1"))
    assert wait_until(lambda: b.events.seen == [("connected", "dev-1/mqtt")], timeout=WAIT_S)

    impostor = clients(b.port, "dev-1", "dev-1", "wrong", clean_session=False)
    assert impostor.connect().is_failure
    impostor.close()

    assert not dev.disconnected.is_set()
    assert b.call_soon(lambda: b.mqtt.deliver_command(command("dev-1")))
    assert json.loads(dev.messages.get(timeout=WAIT_S).payload)["id"] == "c-1"
    assert b.events.seen == [("connected", "dev-1/mqtt")]


def test_a_will_may_only_use_the_devices_own_topics(broker: StartBroker, clients: Make) -> None:
    b = broker()
    credential = b.provision("dev-1")
    b.provision("dev-2")
    forger = clients(b.port, "dev-1", "dev-1", credential)
    forger.client.will_set("devices/dev-2/commands", command_message("c-9", "unlock"), qos=1)
    reason = forger.connect()
    assert reason.is_failure and reason.value == 135
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="will_topic") == 1

    honest = clients(b.port, "dev-1", "dev-1", credential)
    honest.client.will_set("devices/dev-1/state", b'{"online": false}', qos=1)
    assert not honest.connect().is_failure


# -- ACL ---------------------------------------------------------------------------------


def test_publishing_under_another_devices_topic_is_refused(
    broker: StartBroker, clients: Make
) -> None:
    b = broker(mqtt_allow_anonymous=True)
    monitor = clients(b.port, "monitor")
    assert not monitor.connect().is_failure
    assert not monitor.subscribe("devices/#")[0].is_failure
    mallory = device(b, clients, "mallory")
    b.provision("victim")

    refused = mallory.publish("devices/victim/telemetry", telemetry(1))
    refused_result = mallory.publish("devices/victim/commands/c1/result", b'{"ok": true}')
    own = mallory.publish("devices/mallory/telemetry", telemetry(1))
    assert acked(refused) and acked(refused_result) and acked(own)

    assert wait_until(lambda: not monitor.messages.empty(), timeout=WAIT_S)
    time.sleep(0.3)
    received = [m.topic for m in list(monitor.messages.queue)]
    assert received == ["devices/mallory/telemetry"]
    assert [e.device_id for e in b.dispatcher.data()] == ["mallory"]
    assert b.counter("hub_acl_refusals_total", action="publish") == 2


def test_subscribing_beyond_own_commands_is_refused(broker: StartBroker, clients: Make) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")
    for refused in ("devices/dev-2/commands", "devices/+/commands", "devices/#", "#"):
        assert dev.subscribe(refused)[0].is_failure, refused
    for allowed in ("devices/dev-1/commands", "devices/dev-1/commands/#"):
        assert not dev.subscribe(allowed)[0].is_failure, allowed
    assert b.counter("hub_acl_refusals_total", action="subscribe") == 4


def test_commands_reach_only_their_device(broker: StartBroker, clients: Make) -> None:
    b = broker()
    one, two = device(b, clients, "one"), device(b, clients, "two")
    one.subscribe(command_topic("devices", "one"))
    two.subscribe(command_topic("devices", "two"))

    b.call(b.mqtt.publish(command_topic("devices", "one"), command_message("c1", "reboot"), 1))
    message = one.messages.get(timeout=WAIT_S)
    assert json.loads(message.payload) == {"id": "c1", "name": "reboot", "args": {}}
    time.sleep(0.3)
    assert two.messages.empty()


def command(device_id: str, command_id: str = "c-1") -> PendingCommand:
    expires = datetime.now(UTC) + timedelta(minutes=1)
    return PendingCommand(command_id, device_id, "blink", {"times": 2}, expires)


def test_a_device_is_reachable_for_commands_once_subscribed(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")
    assert not b.call_soon(lambda: b.mqtt.deliver_command(command("dev-1")))
    assert b.events.seen == []

    dev.subscribe(command_topic("devices", "dev-1"))
    assert wait_until(lambda: b.events.seen == [("connected", "dev-1/mqtt")], timeout=WAIT_S)
    assert b.call_soon(lambda: b.mqtt.deliver_command(command("dev-1")))
    message = dev.messages.get(timeout=WAIT_S)
    assert message.topic == "devices/dev-1/commands"
    assert json.loads(message.payload) == {"id": "c-1", "name": "blink", "args": {"times": 2}}
    assert not b.call_soon(lambda: b.mqtt.deliver_command(command("someone-else")))

    answer = dev.publish("devices/dev-1/commands/c-1/result", b'{"ok": true, "result": "done"}')
    assert acked(answer)
    assert dict(b.dispatcher.data()[0].payload)["command_id"] == "c-1"

    dev.close()
    assert wait_until(lambda: ("disconnected", "dev-1") in b.events.seen, timeout=WAIT_S)
    assert not b.call_soon(lambda: b.mqtt.deliver_command(command("dev-1")))


def test_a_persistent_session_is_reachable_again_without_subscribing(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    first = device(b, clients, "dev-1", clean_session=False)
    first.subscribe(command_topic("devices", "dev-1"))
    first.close()
    assert wait_until(lambda: len(b.events.seen) == 2, timeout=WAIT_S)

    again = clients(b.port, "dev-1", "dev-1", b.registry["dev-1"], clean_session=False)
    assert not again.connect().is_failure
    assert wait_until(lambda: len(b.events.seen) == 3, timeout=WAIT_S)
    assert b.events.seen[-1] == ("connected", "dev-1/mqtt")
    assert b.call_soon(lambda: b.mqtt.deliver_command(command("dev-1", "c-2")))
    assert json.loads(again.messages.get(timeout=WAIT_S).payload)["id"] == "c-2"


def test_anonymous_clients_are_a_plain_broker_and_never_bridged(
    broker: StartBroker, clients: Make
) -> None:
    b = broker(mqtt_allow_anonymous=True)
    listener = clients(b.port, "listener")
    assert not listener.connect().is_failure
    listener.subscribe("anything/#")
    talker = clients(b.port, "talker")
    assert not talker.connect().is_failure

    assert acked(talker.publish("anything/goes", b"hello"))
    assert acked(talker.publish("devices/dev-1/telemetry", telemetry(1)))
    assert listener.messages.get(timeout=WAIT_S).payload == b"hello"
    assert b.dispatcher.data() == []


# -- payloads and limits ------------------------------------------------------------------


def test_invalid_payload_is_counted_and_later_messages_arrive(
    broker: StartBroker, clients: Make
) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")

    bad = dev.publish("devices/dev-1/telemetry", b"not json")
    good = dev.publish("devices/dev-1/telemetry", telemetry(2))
    assert acked(bad) and acked(good)
    assert b.counter("hub_invalid_payloads_total", transport="mqtt") == 1
    assert [e.seq for e in b.dispatcher.data()] == [2]
    assert dev.client.is_connected()


def test_command_result_is_bridged(broker: StartBroker, clients: Make) -> None:
    b = broker()
    dev = device(b, clients, "dev-1")
    info = dev.publish("devices/dev-1/commands/c-7/result", b'{"ok": false, "error": "busy"}')
    assert acked(info)
    (envelope,) = b.dispatcher.data()
    assert envelope.kind is Kind.COMMAND_RESULT
    assert dict(envelope.payload) == {
        "command_id": "c-7",
        "ok": False,
        "result": None,
        "error": "busy",
    }


def test_oversized_packet_closes_the_connection(broker: StartBroker, clients: Make) -> None:
    b = broker(mqtt_max_packet_bytes=1024)
    dev = device(b, clients, "dev-1")
    dev.publish("devices/dev-1/telemetry", json.dumps({"blob": "x" * 2000}))
    assert dev.disconnected.wait(WAIT_S)
    assert b.counter("hub_protocol_errors_total", transport="mqtt", reason="packet_too_large") == 1
    assert b.dispatcher.data() == []


def test_a_silent_connection_is_closed(broker: StartBroker) -> None:
    b = broker(mqtt_connect_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", b.port), timeout=WAIT_S) as sock:
        assert sock.recv(1) == b""
    assert b.counter("hub_protocol_errors_total", transport="mqtt", reason="connect_timeout") == 1


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def raw_connect(client_id: str, username: str, password: str, keepalive_s: int) -> bytes:
    """A CONNECT packet (MQTT 3.1.1, clean session), written by hand."""
    body = (
        _mqtt_string("MQTT")
        + bytes([4, 0b1100_0010])  # level 4; username, password, clean session
        + keepalive_s.to_bytes(2, "big")
        + _mqtt_string(client_id)
        + _mqtt_string(username)
        + _mqtt_string(password)
    )
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def test_a_client_silent_beyond_its_keepalive_is_disconnected(broker: StartBroker) -> None:
    b = broker()
    credential = b.provision("quiet")
    with socket.create_connection(("127.0.0.1", b.port), timeout=WAIT_S) as sock:
        started = time.monotonic()  # the hub counts from the CONNECT
        sock.sendall(raw_connect("quiet", "quiet", credential, keepalive_s=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        assert wait_until(lambda: b.mqtt.connected_devices == 1, timeout=WAIT_S)
        assert sock.recv(1) == b""  # closed by the hub
        assert 1.5 <= time.monotonic() - started < 5
    assert wait_until(lambda: b.mqtt.connected_devices == 0, timeout=WAIT_S)


def test_a_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        b = Broker(tmp_path, mqtt_port=port)
        try:
            with pytest.raises(ConfigError) as caught:
                b.call(b.mqtt.start())
        finally:
            b.close()
    assert caught.value.key == "mqtt_port"
    assert str(port) in str(caught.value)
    assert "mqtt_port / HUB_MQTT_PORT" in str(caught.value)


# -- the whole pipeline: RabbitMQ, a worker, the database --------------------------------

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]


@pytest.mark.integration
def test_twenty_mqtt_devices_two_hundred_messages_each_are_stored_once(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    creds = provision([f"{device_prefix}{n}" for n in range(1, 21)])

    summary = asyncio.run(
        run_fleet(
            FleetOptions(
                transport="mqtt",
                host="127.0.0.1",
                port=hub.mqtt_port,
                devices=list(creds.items()),
                messages=200,
                qos=1,
            )
        )
    )

    assert summary.sent == 4000
    assert summary.acknowledged == 4000
    assert summary.refused == 0 and summary.errors == 0
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= 4000)
    time.sleep(1)  # anything more would be a duplicate
    assert count_rows(engine, device_prefix=device_prefix) == 4000
    assert hub.counter("hub_messages_acked_total", transport="mqtt") == 4000


@pytest.mark.integration
def test_mqtt_packets_split_into_random_pieces_and_delayed_are_all_acknowledged(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    creds = provision([f"{device_prefix}{n}" for n in range(1, 4)])
    fault = chain(SplitRandomly(6, seed=5), DelayWrites(0.002))

    summary = asyncio.run(
        run_fleet(
            FleetOptions(
                transport="mqtt",
                host="127.0.0.1",
                port=hub.mqtt_port,
                devices=list(creds.items()),
                messages=50,
                qos=1,
                fault=fault,
            )
        )
    )

    assert summary.sent == summary.acknowledged == 150
    assert summary.refused == 0 and summary.errors == 0
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= 150)
    assert count_rows(engine, device_prefix=device_prefix) == 150


@pytest.mark.integration
def test_nothing_published_under_another_devices_topic_is_stored(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    mallory, victim = f"{device_prefix}mallory", f"{device_prefix}victim"
    creds = provision([mallory, victim])
    client = Client(hub.mqtt_port, mallory, mallory, creds[mallory])
    try:
        assert not client.connect().is_failure
        foreign = [client.publish(f"devices/{victim}/telemetry", telemetry(n)) for n in range(10)]
        marker = client.publish(f"devices/{mallory}/telemetry", telemetry(1))
        assert all(acked(i) for i in [*foreign, marker])
    finally:
        client.close()

    assert wait_until(lambda: count_rows(engine, device_prefix=mallory) == 1)
    assert count_rows(engine, device_prefix=victim) == 0
    assert hub.counter("hub_acl_refusals_total", action="publish") == 10


@pytest.mark.integration
def test_wrong_password_is_refused_by_the_hub(running_hub: StartHub, provision: Provision) -> None:
    hub = running_hub(mqtt_enabled=True)
    (device_id,) = provision(["wrong-password-device"])
    client = Client(hub.mqtt_port, device_id, device_id, "not-it")
    try:
        assert client.connect().is_failure
    finally:
        client.close()
    assert hub.counter("hub_auth_failures_total", transport="mqtt", reason="bad_credential") == 1


@pytest.mark.integration
def test_an_invalid_payload_is_counted_and_the_valid_ones_are_stored(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    device_id = f"{device_prefix}dev"
    creds = provision([device_id])
    client = Client(hub.mqtt_port, device_id, device_id, creds[device_id])
    try:
        assert not client.connect().is_failure
        topic = f"devices/{device_id}/telemetry"
        infos = [client.publish(topic, telemetry(n)) for n in range(1, 6)]
        infos.append(client.publish(topic, b'{"values": "not an object"}'))
        infos += [client.publish(topic, telemetry(n)) for n in range(6, 11)]
        assert all(acked(i) for i in infos)
    finally:
        client.close()

    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= 10)
    time.sleep(0.5)
    assert count_rows(engine, device_prefix=device_prefix) == 10
    assert hub.counter("hub_invalid_payloads_total", transport="mqtt") == 1
