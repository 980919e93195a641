"""External-broker mode against the Mosquitto on 127.0.0.1:1883.

Every test uses a topic root and shared group of its own (`hubtest-<uuid>`)
and unique client ids, publishes nothing retained, and removes the persistent
sessions it created, so it neither sees nor disturbs anything else on that
broker.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import Engine

from bridges.backpressure import Room
from bridges.mqtt.external import ExternalMqttBridge, parse_broker_url
from hub.envelope import Envelope, Kind
from hub.errors import ConfigError
from hub.metrics import Metrics
from hub.settings import Settings
from hub.storage import count_rows
from tests.support.processes import HubThread, Worker, make_test_settings, wait_until
from tests.support.services import MOSQUITTO_PORT, require_mosquitto

T = TypeVar("T")
WAIT_S = 15.0
URL = f"mqtt://127.0.0.1:{MOSQUITTO_PORT}"


@pytest.fixture(autouse=True)
def _mosquitto() -> None:
    require_mosquitto()


@pytest.fixture
def names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {"root": f"hubtest-{tag}", "group": f"hubtest-{tag}", "tag": tag}


class Recorder:
    """A dispatcher double; `hold` keeps every future pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, hold: bool = False) -> None:
        self.loop = loop
        self.hold = hold
        self.envelopes: list[Envelope] = []
        self.room = Room(1_000_000)  # never full

    def submit(self, envelope: Envelope) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self.envelopes.append(envelope)
        if not self.hold:
            future.set_result(None)
        return future


class Bridge:
    """An ExternalMqttBridge on a background event loop."""

    def __init__(
        self, data_dir: Path, names: dict[str, str], client_id: str, *, hold: bool = False
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.settings = make_test_settings(
            data_dir,
            mqtt_enabled=True,
            mqtt_external_url=URL,
            mqtt_topic_root=names["root"],
            mqtt_shared_group=names["group"],
        )
        self.metrics = Metrics()
        self.recorder = Recorder(self.loop, hold=hold)
        self.bridge = ExternalMqttBridge(
            self.settings, self.recorder, self.metrics, client_id=client_id, drain_timeout_s=0.2
        )
        self.call(self.bridge.start())
        assert self.bridge.ready
        self._stopped = False

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def counter(self, name: str, **labels: str) -> float:
        return float(self.metrics.registry.get_sample_value(name, labels) or 0.0)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.bridge.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT_S)
            self.loop.close()


def purge_session(client_id: str) -> None:
    """Remove the broker's persistent session of `client_id` (connect with clean session)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )
    client.connect("127.0.0.1", MOSQUITTO_PORT)
    client.loop_start()
    try:
        assert wait_until(client.is_connected, timeout=WAIT_S, interval=0.02)
    finally:
        client.disconnect()
        client.loop_stop()


class Publisher:
    """A device-side client publishing QoS 1 straight to Mosquitto."""

    def __init__(self, tag: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"hubtest-pub-{tag}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", MOSQUITTO_PORT)
        self.client.loop_start()
        assert wait_until(self.client.is_connected, timeout=WAIT_S, interval=0.02)

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def bridges(tmp_path: Path, names: dict[str, str]) -> Iterator[Callable[..., Bridge]]:
    made: list[Bridge] = []
    client_ids: set[str] = set()

    def start(name: str, *, hold: bool = False) -> Bridge:
        client_id = f"hubtest-{names['tag']}-{name}"
        client_ids.add(client_id)
        b = Bridge(tmp_path / f"{name}{len(made)}", names, client_id, hold=hold)
        made.append(b)
        return b

    yield start
    for b in made:
        b.stop()
    for client_id in client_ids:
        purge_session(client_id)


@pytest.fixture
def publisher(names: dict[str, str]) -> Iterator[Publisher]:
    p = Publisher(names["tag"])
    yield p
    p.close()


def telemetry(seq: int) -> bytes:
    return json.dumps({"seq": seq, "boot": 1, "values": {"n": seq}}).encode()


# -- the bridge alone, with a dispatcher double ------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", ("127.0.0.1", 1883, None, None, False)),
        ("mqtt://broker", ("broker", 1883, None, None, False)),
        ("mqtts://u:p%40ss@broker:8884", ("broker", 8884, "u", "p@ss", True)),
    ],
)
def test_parse_broker_url(url: str, expected: tuple[Any, ...]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url", ["http://broker", "mqtt://", "mqtt://broker:notaport", "mqtt://u:secret@h/path"]
)
def test_bad_broker_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_broker_url(url)
    assert caught.value.key == "mqtt_external_url"
    assert "secret" not in str(caught.value)


def test_an_unreachable_broker_does_not_stop_the_hub(tmp_path: Path, names: dict[str, str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = make_test_settings(
        tmp_path,
        mqtt_enabled=True,
        mqtt_external_url=f"mqtt://127.0.0.1:{port}",
        mqtt_topic_root=names["root"],
        mqtt_connect_timeout_s=0.5,
    )

    async def run() -> bool:
        loop = asyncio.get_running_loop()
        bridge = ExternalMqttBridge(
            settings, Recorder(loop), Metrics(), client_id=f"hubtest-{names['tag']}-x"
        )
        await bridge.start()  # logs a warning and keeps trying
        ready = bridge.ready
        await bridge.stop()
        return ready

    assert asyncio.run(run()) is False


def test_messages_are_bridged_and_acknowledged(
    bridges: Callable[..., Bridge], publisher: Publisher, names: dict[str, str]
) -> None:
    b = bridges("solo")
    root = names["root"]
    infos = [
        publisher.publish(f"{root}/dev-1/telemetry", telemetry(1)),
        publisher.publish(f"{root}/dev-1/events", b'{"door": "open"}'),
        publisher.publish(f"{root}/dev-2/state", b'{"on": true}'),
        publisher.publish(f"{root}/dev-2/commands/c-1/result", b'{"ok": true, "result": 3}'),
        publisher.publish(f"{root}/dev-2/telemetry", b"not json"),
        publisher.publish(f"{root}/dev-2/telemetry", telemetry(2)),
    ]
    assert all(wait_until(i.is_published, timeout=WAIT_S, interval=0.02) for i in infos)
    assert wait_until(lambda: len(b.recorder.envelopes) == 5, timeout=WAIT_S)
    kinds = [(e.device_id, e.kind) for e in b.recorder.envelopes]
    assert kinds == [
        ("dev-1", Kind.TELEMETRY),
        ("dev-1", Kind.EVENT),
        ("dev-2", Kind.STATE),
        ("dev-2", Kind.COMMAND_RESULT),
        ("dev-2", Kind.TELEMETRY),
    ]
    assert b.counter("hub_invalid_payloads_total", transport="mqtt") == 1
    assert wait_until(lambda: b.counter("hub_messages_acked_total", transport="mqtt") == 5)


def test_a_message_not_yet_durable_is_delivered_again_after_a_restart(
    bridges: Callable[..., Bridge], publisher: Publisher, names: dict[str, str]
) -> None:
    first = bridges("restart", hold=True)
    publisher.publish(f"{names['root']}/dev-1/telemetry", telemetry(42))
    assert wait_until(lambda: len(first.recorder.envelopes) == 1, timeout=WAIT_S)
    first.stop()  # its future never resolved: no PUBACK went to the broker
    assert first.counter("hub_messages_acked_total", transport="mqtt") == 0

    second = bridges("restart")  # the same client id, so the same session
    assert wait_until(lambda: len(second.recorder.envelopes) == 1, timeout=WAIT_S)
    again = second.recorder.envelopes[0]
    assert (again.seq, again.id) == (42, first.recorder.envelopes[0].id)
    assert wait_until(lambda: second.counter("hub_messages_acked_total", transport="mqtt") == 1)

    # Acknowledged now: a third start receives nothing.
    second.stop()
    third = bridges("restart")
    time.sleep(1.0)
    assert third.recorder.envelopes == []


def test_two_bridges_split_the_messages_and_none_is_processed_twice(
    bridges: Callable[..., Bridge], publisher: Publisher, names: dict[str, str]
) -> None:
    one, two = bridges("one"), bridges("two")
    total = 300
    infos = [
        publisher.publish(f"{names['root']}/dev-{n % 6}/telemetry", telemetry(n))
        for n in range(total)
    ]
    assert all(wait_until(i.is_published, timeout=WAIT_S, interval=0.02) for i in infos)
    received = lambda: len(one.recorder.envelopes) + len(two.recorder.envelopes)  # noqa: E731
    assert wait_until(lambda: received() >= total, timeout=WAIT_S)
    time.sleep(0.5)
    ids = [e.id for e in one.recorder.envelopes + two.recorder.envelopes]
    assert len(ids) == total == len(set(ids))
    assert one.recorder.envelopes and two.recorder.envelopes


# -- the whole pipeline: two hubs, RabbitMQ, a worker, the database ----------------------


@pytest.mark.integration
def test_two_hubs_bridging_one_broker_store_every_message_once(
    worker: Worker,
    hub_settings_factory: Callable[..., Settings],
    engine: Engine,
    device_prefix: str,
    names: dict[str, str],
    publisher: Publisher,
) -> None:
    options = {
        "mqtt_enabled": True,
        "mqtt_external_url": URL,
        "mqtt_topic_root": names["root"],
        "mqtt_shared_group": names["group"],
    }
    hubs: list[HubThread] = []
    try:
        for _ in range(2):
            hubs.append(HubThread(hub_settings_factory(**options)))
        assert all(h.app.mqtt.ready for h in hubs)
        devices = [f"{device_prefix}{n}" for n in range(5)]
        infos = [
            publisher.publish(f"{names['root']}/{device_id}/telemetry", telemetry(seq))
            for seq in range(1, 101)
            for device_id in devices
        ]
        assert all(wait_until(i.is_published, timeout=WAIT_S, interval=0.02) for i in infos)

        expected = len(devices) * 100
        assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= expected)
        time.sleep(1)
        assert count_rows(engine, device_prefix=device_prefix) == expected
        received = [h.counter("hub_messages_received_total", transport="mqtt") for h in hubs]
        assert sum(received) == expected  # each message reached exactly one hub
        assert all(r > 0 for r in received)
        assert wait_until(
            lambda: (
                sum(h.counter("hub_messages_acked_total", transport="mqtt") for h in hubs)
                == expected
            )
        )
    finally:
        client_ids = [h.app.mqtt.client_id for h in hubs]
        for h in hubs:
            h.stop()
        for client_id in client_ids:
            purge_session(client_id)
