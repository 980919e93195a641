"""Commands to devices and their results, read from any process (real RabbitMQ,
real worker, real hubs, simulated devices)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hub.errors import CommandExpired, CommandFailed
from tests.support.processes import (
    ROOT,
    HubThread,
    SimulatedDevice,
    Worker,
    settings_env,
    wait_until,
)

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]
StartDevice = Callable[..., SimulatedDevice]


DeviceOn = Callable[..., str]


@pytest.fixture
def device_on(provision: Provision, simulated_devices: StartDevice, device_prefix: str) -> DeviceOn:
    """Register a device and start it (answering commands) on a hub's port of `transport`."""

    def start(hub: HubThread, transport: str, name: str) -> str:
        device_id = f"{device_prefix}{name}"
        credential = provision([device_id])[device_id]
        port = hub.tcp_port if transport == "tcp" else hub.mqtt_port
        simulated_devices(transport, port, device_id, credential)
        return device_id

    return start


def _online(hub: HubThread, device_id: str) -> bool:
    return any(device_id in s.devices for s in hub.app.tcp_servers)


def test_a_tcp_device_answers_through_asyncresult(
    worker: Worker,
    running_hub: StartHub,
    device_on: DeviceOn,
    command_api: Any,
) -> None:
    hub = running_hub()
    device_id = device_on(hub, "tcp", "1")
    assert wait_until(lambda: _online(hub, device_id), timeout=10)

    result = command_api.send_command(device_id, "ping", ttl=30)
    reply = result.get(timeout=30)

    assert reply["pong"] is True and reply["device"] == device_id
    assert result.ready() and result.successful()


def test_a_command_reaches_the_device_through_the_hub_that_holds_it(
    worker: Worker,
    running_hub: StartHub,
    device_on: DeviceOn,
    command_api: Any,
) -> None:
    holding = running_hub()
    other = running_hub()
    device_id = device_on(holding, "tcp", "1")
    assert wait_until(lambda: _online(holding, device_id), timeout=10)

    reply = command_api.send_command(device_id, "set_interval", {"seconds": 2}, ttl=30).get(
        timeout=30
    )

    assert reply == {"interval_s": 2.0}
    assert holding.app.downlink.delivered == 1
    assert other.app.downlink.delivered == 0


def test_a_command_to_an_offline_device_is_delivered_when_it_connects(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    simulated_devices: StartDevice,
    command_api: Any,
    device_prefix: str,
) -> None:
    hub = running_hub()
    ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
    result = command_api.send_command(device_id, "ping", ttl=60)
    assert not result.ready()

    simulated_devices("tcp", hub.tcp_port, device_id, credential)

    assert result.get(timeout=30)["pong"] is True


def test_a_command_nobody_answers_expires(
    worker: Worker,
    command_api: Any,
    provision: Provision,
    device_prefix: str,
) -> None:
    ((device_id, _),) = provision([f"{device_prefix}1"]).items()
    result = command_api.send_command(device_id, "ping", ttl=1)

    with pytest.raises(CommandExpired, match="did not answer"):
        result.get(timeout=30)
    assert result.failed()


def test_a_failing_command_shows_its_error_and_traceback(
    worker: Worker,
    running_hub: StartHub,
    device_on: DeviceOn,
    command_api: Any,
) -> None:
    hub = running_hub()
    device_id = device_on(hub, "tcp", "1")

    result = command_api.send_command(device_id, "fail", ttl=30)
    error = result.get(timeout=30, propagate=False)

    assert isinstance(error, CommandFailed)
    assert "failed on purpose" in str(error)
    assert result.failed()
    assert "failed on purpose" in result.traceback
    with pytest.raises(CommandFailed):
        result.get(timeout=1)


def test_hub_send_prints_the_reply_or_the_error(
    worker: Worker,
    running_hub: StartHub,
    device_on: DeviceOn,
    tmp_path: Path,
) -> None:
    hub = running_hub()
    device_id = device_on(hub, "tcp", "1")
    env = settings_env(hub.settings)

    def hub_send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hubapp.cli", "send", device_id, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = hub_send("set_interval", "--args", '{"seconds": 3}', "--wait", "30", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["result"] == {"interval_s": 3.0}

    failed = hub_send("fail", "--wait", "30")
    assert failed.returncode == 1
    assert "failed on purpose" in failed.stderr and "Traceback" not in failed.stderr

    bad_args = hub_send("ping", "--args", "[1]")
    assert bad_args.returncode == 1 and "JSON object" in bad_args.stderr


def test_an_mqtt_device_answers_through_asyncresult(
    worker: Worker,
    running_hub: StartHub,
    device_on: DeviceOn,
    command_api: Any,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    device_id = device_on(hub, "mqtt", "m1")

    reply = command_api.send_command(device_id, "ping", ttl=30).get(timeout=30)
    assert reply["pong"] is True and reply["device"] == device_id

    failing = command_api.send_command(device_id, "fail", ttl=30)
    error = failing.get(timeout=30, propagate=False)
    assert isinstance(error, CommandFailed) and "failed on purpose" in failing.traceback


def test_an_mqtt_command_from_a_hub_that_does_not_hold_the_device(
    worker: Worker,
    running_hub: StartHub,
    device_on: DeviceOn,
    command_api: Any,
) -> None:
    holding = running_hub(mqtt_enabled=True)
    other = running_hub(mqtt_enabled=True)
    device_id = device_on(holding, "mqtt", "m2")

    reply = command_api.send_command(device_id, "set_interval", {"seconds": 4}, ttl=30).get(
        timeout=30
    )

    assert reply == {"interval_s": 4.0}
    assert holding.app.downlink.delivered >= 1
    assert other.app.downlink.delivered == 0
