"""Commands through an external broker: the Mosquitto on 127.0.0.1:1883, real
hubs in external-broker mode, a real worker, RabbitMQ and a simulated device.

Every test uses a topic root, shared group and client ids of its own
(`hubtest-<uuid>`), publishes nothing retained, and removes the persistent
sessions of its hubs afterwards (tests/integration/test_mqtt_external.py).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import Engine

from hub.commands import PENDING, PendingCommand, command_status, pending_commands
from hub.errors import CommandExpired
from hub.hubs import live_hub_ids
from hub.settings import Settings
from hub.storage import count_rows
from tests.integration.test_mqtt_external import URL, WAIT_S, purge_session
from tests.support.processes import HubThread, SimulatedDevice, Worker, wait_until
from tests.support.services import MOSQUITTO_PORT, require_mosquitto

pytestmark = pytest.mark.integration

StartHub = Callable[[], HubThread]


@pytest.fixture(autouse=True)
def _mosquitto() -> None:
    require_mosquitto()


@pytest.fixture
def root() -> str:
    return f"hubtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def external_hub(
    hub_settings_factory: Callable[..., Settings], root: str, engine: Engine
) -> Iterator[StartHub]:
    """Start hubs in external-broker mode under `root`, each returned once its
    heartbeat is written (send_command finds it there); stopped and their
    broker sessions removed after the test."""
    started: list[HubThread] = []

    def start() -> HubThread:
        hub = HubThread(
            hub_settings_factory(
                mqtt_enabled=True,
                mqtt_external_url=URL,
                mqtt_topic_root=root,
                mqtt_shared_group=root,
            )
        )
        started.append(hub)
        assert hub.app.mqtt is not None and hub.app.mqtt.serving
        assert wait_until(lambda: hub.app.downlink.hub_id in live_hub_ids(engine), timeout=WAIT_S)
        return hub

    yield start
    client_ids = [_bridge(h).client_id for h in started]
    for hub in started:
        hub.stop()
    for client_id in client_ids:
        purge_session(client_id)


def _bridge(hub: HubThread) -> Any:
    from bridges.mqtt.external import ExternalMqttBridge

    assert isinstance(hub.app.mqtt, ExternalMqttBridge)
    return hub.app.mqtt


class CommandWatcher:
    """A clean-session client that records every command published under `root`."""

    def __init__(self, root: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{root}-watcher",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{root}/+/commands", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", MOSQUITTO_PORT)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def ids(self) -> list[str]:
        with self._lock:
            return [body["id"] for _, body in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watcher(root: str) -> Iterator[CommandWatcher]:
    w = CommandWatcher(root)
    yield w
    w.close()


def _published(hubs: list[HubThread]) -> int:
    return sum(int(_bridge(h).commands_published) for h in hubs)


def test_a_command_reaches_a_device_on_the_external_broker_and_its_result_is_read(
    worker: Worker,
    external_hub: StartHub,
    simulated_devices: Callable[..., SimulatedDevice],
    command_api: Any,
    engine: Engine,
    device_prefix: str,
    root: str,
    watcher: CommandWatcher,
) -> None:
    hub = external_hub()
    device_id = f"{device_prefix}ext"
    simulated_devices("mqtt", MOSQUITTO_PORT, device_id, "unused", messages=1, topic_root=root)
    # Its telemetry is stored: it is connected and subscribed to its commands.
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) == 1)

    result = command_api.send_command(device_id, "set_interval", {"seconds": 3}, ttl=30)

    assert result.get(timeout=30) == {"interval_s": 3.0}
    assert result.successful()
    assert watcher.ids() == [result.id]
    assert watcher.messages[0][0] == f"{root}/{device_id}/commands"
    assert _published([hub]) == 1
    assert command_status(engine, result.id) == "succeeded"


def test_a_command_to_a_device_not_on_the_broker_expires(
    worker: Worker,
    external_hub: StartHub,
    command_api: Any,
    engine: Engine,
    device_prefix: str,
    watcher: CommandWatcher,
) -> None:
    hub = external_hub()
    result = command_api.send_command(f"{device_prefix}away", "ping", ttl=1)

    with pytest.raises(CommandExpired, match="did not answer"):
        result.get(timeout=30)
    assert result.failed()
    assert command_status(engine, result.id) == "expired"
    # Published once at send time (the broker had nobody to queue it for).
    assert wait_until(lambda: watcher.ids() == [result.id], timeout=WAIT_S)
    assert _published([hub]) == 1


def test_a_command_handed_to_every_hub_is_published_once(
    worker: Worker,
    external_hub: StartHub,
    command_api: Any,
    engine: Engine,
    device_prefix: str,
    watcher: CommandWatcher,
) -> None:
    hubs = [external_hub(), external_hub()]
    device_id = f"{device_prefix}once"
    result = command_api.send_command(device_id, "ping", ttl=30)
    assert wait_until(lambda: len(watcher.ids()) == 1, timeout=WAIT_S)
    assert wait_until(lambda: _published(hubs) == 1, timeout=WAIT_S)

    # Hand the same command to both hubs again, as a device's reconnect or a
    # repeated downlink message would: the claim in the database lets none
    # of them publish it a second time.
    (command,) = pending_commands(engine, device_id)
    assert command.id == result.id and command_status(engine, result.id) != PENDING
    for hub in hubs:
        assert hub.call_soon(lambda h=hub: h.app.downlink.deliver(_copy(command)))
    # The bridges' claims run in the background; give them time to answer.
    assert not wait_until(lambda: _published(hubs) > 1, timeout=2)
    assert watcher.ids() == [result.id]


def _copy(command: PendingCommand) -> PendingCommand:
    return PendingCommand.from_dict(command.to_dict())
