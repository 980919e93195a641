"""Commands for a device whose hub died, and nudges that come late: each command is
delivered on the device's next connect to any hub, never lost, and never handed
twice (real RabbitMQ, a real worker, a `hub run` process SIGKILLed, an in-process
hub, simulated devices; see bridges/downlink.py and docs/scaling.md)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import Engine, select

from hub.commands import SUCCEEDED, PendingCommand, command_status, downlink_queue
from hub.storage import CommandRow, DeviceConnection
from tests.reliability.harness import HubOptions, HubProcess
from tests.support.processes import HubThread, SimulatedDevice, Worker, wait_until

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]


def _holder(engine: Engine, device_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            select(DeviceConnection.hub_id).where(DeviceConnection.device_id == device_id)
        ).scalar_one_or_none()


def _pending(engine: Engine, command_id: str) -> PendingCommand:
    with engine.connect() as conn:
        row = conn.execute(select(CommandRow).where(CommandRow.id == command_id)).one()
    return PendingCommand(row.id, row.device_id, row.name, dict(row.args), row.expires_at)


@pytest.mark.parametrize("transport", ["tcp", "mqtt"])
def test_a_command_sent_to_a_hub_that_died_is_delivered_once_on_the_next_connect(
    transport: str,
    tmp_path: Path,
    worker: Worker,
    rabbitmq_url: str,
    database_url: str,
    engine: Engine,
    running_hub: StartHub,
    provision: Provision,
    command_api: Any,
    device_prefix: str,
) -> None:
    ((device_id, credential),) = provision([f"{device_prefix}moved"]).items()
    dying_id = f"dying-{uuid.uuid4().hex[:8]}"
    dying = HubProcess(
        HubOptions(
            data_dir=tmp_path / "dying",
            database_url=database_url,
            broker_url=rabbitmq_url,
            handlers=(),
            mqtt=transport == "mqtt",
            env={"HUB_HUB_ID": dying_id},
        )
    )
    try:
        dying.start()
        port = dying.options.tcp_port if transport == "tcp" else dying.options.mqtt_port
        first = SimulatedDevice(transport, port, device_id, credential)
        try:
            assert wait_until(lambda: _holder(engine, device_id) == dying_id, timeout=30)
            dying.kill()
        finally:
            first.stop()
        # What a dead hub leaves: the database still says it holds the device.
        assert _holder(engine, device_id) == dying_id

        result = command_api.send_command(device_id, "ping", ttl=60)

        alive = running_hub(mqtt_enabled=transport == "mqtt")
        port = alive.tcp_port if transport == "tcp" else alive.mqtt_port
        second = SimulatedDevice(transport, port, device_id, credential)
        try:
            assert result.get(timeout=30)["pong"] is True
        finally:
            summary = second.stop()
        assert summary.commands_answered == 1
        assert alive.app.downlink.delivered == 1
        assert command_status(engine, result.id) == SUCCEEDED
    finally:
        dying.close()


def test_a_late_nudge_of_an_answered_command_is_not_delivered_again(
    worker: Worker,
    rabbitmq_url: str,
    engine: Engine,
    running_hub: StartHub,
    provision: Provision,
    simulated_devices: Callable[..., SimulatedDevice],
    command_api: Any,
    device_prefix: str,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    ((device_id, credential),) = provision([f"{device_prefix}late"]).items()
    simulated_devices("mqtt", hub.mqtt_port, device_id, credential)
    answered = command_api.send_command(device_id, "ping", ttl=60)
    assert answered.get(timeout=30)["pong"] is True
    delivered = hub.app.downlink.delivered

    # The same command's nudge once more, as RabbitMQ hands a nudge again whose
    # acknowledgement it did not get, or a hung hub's queue holds it until later.
    with Connection(rabbitmq_url) as conn:
        conn.Producer(serializer="json").publish(
            _pending(engine, answered.id).to_dict(),
            exchange="",
            routing_key=downlink_queue(hub.app.downlink.hub_id),
        )
    # The queue is first in, first out: once a later command is answered, the
    # late nudge has been handled.
    later = command_api.send_command(device_id, "ping", ttl=60)
    assert later.get(timeout=30)["pong"] is True

    assert hub.app.downlink.delivered == delivered + 1
