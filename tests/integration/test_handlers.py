"""User handlers end to end: a handler that commands a device when its telemetry
crosses a threshold, and a raising handler that ends in the dead-letter queue
while everything else keeps flowing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from kombu import Connection
from sqlalchemy import Engine

from bridges.queues import queue_depths
from firmware_sim.fleet import run_tcp_fleet
from hub.commands import SUCCEEDED
from hub.protocol.events import Ack, Command, CommandResult
from hub.routing import DEAD_LETTER_QUEUE
from hub.storage import CommandRow, count_rows
from tests.support.processes import ROOT, HubThread, Worker, settings_env, wait_until
from tests.support.raw_device import RawDevice

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]


def test_a_handler_commands_a_device_that_runs_hot(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    connect: Callable[[int], RawDevice],
    device_prefix: str,
) -> None:
    hub = running_hub()
    device_id = f"{device_prefix}hot-1"
    ((_, credential),) = provision([device_id]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    device.telemetry(1, {"temperature": 21.0})
    device.telemetry(2, {"temperature": 35.5})
    assert device.acks_until(2) == {1, 2}

    command = device.next_event(timeout=30)
    assert isinstance(command, Command)
    assert (command.name, dict(command.args)) == ("set_interval", {"seconds": 5})
    device.send(
        CommandResult(seq=3, command_id=command.command_id, ok=True, result={"interval_s": 5.0})
    )

    def answered() -> bool:
        with engine.connect() as conn:
            status = conn.execute(
                CommandRow.__table__.select().where(CommandRow.id == command.command_id)
            ).first()
        return status is not None and status.status == SUCCEEDED

    assert wait_until(answered, timeout=30)


def _dead_letters_of(broker_url: str, device_id: str, timeout: float) -> list[dict[str, object]]:
    """Take this test's messages off the dead-letter queue (others' stay)."""
    found: list[dict[str, object]] = []

    def collect() -> bool:
        with Connection(broker_url) as conn:
            queue = conn.SimpleQueue(DEAD_LETTER_QUEUE)
            try:
                while True:
                    try:
                        message = queue.get(timeout=0.5)
                    except queue.Empty:
                        break
                    body = message.payload
                    if body["envelope"]["device_id"] == device_id:
                        found.append(body)
                        message.ack()
                    else:
                        message.requeue()
                        break
            finally:
                queue.close()
        return bool(found)

    wait_until(collect, timeout=timeout, interval=1)
    return found


def test_a_raising_handler_is_retried_then_dead_lettered_while_the_rest_flows(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    connect: Callable[[int], RawDevice],
    device_prefix: str,
    rabbitmq_url: str,
) -> None:
    hub = running_hub()
    boom_id = f"{device_prefix}boom-1"
    healthy = [f"{device_prefix}ok-{n}" for n in range(1, 6)]
    creds = provision([boom_id, *healthy])
    device = connect(hub.tcp_port)
    assert device.hello(boom_id, creds[boom_id]) == Ack(0)
    device.telemetry(1, {"temperature": 20.0})
    assert device.acks_until(1) == {1}

    summary = asyncio.run(
        run_tcp_fleet("127.0.0.1", hub.tcp_port, [(d, creds[d]) for d in healthy], messages=100)
    )
    assert summary.acknowledged == 500
    assert wait_until(lambda: count_rows(engine, device_prefix=f"{device_prefix}ok-") == 500)

    def dead_lettered() -> bool:
        return (queue_depths(rabbitmq_url).get(DEAD_LETTER_QUEUE) or 0) >= 1

    # Three retries with backoff (0.5 + 1 + 2 s), then the dead-letter queue.
    assert wait_until(dead_lettered, timeout=60, interval=0.5)
    status = subprocess.run(
        [sys.executable, "-m", "hub.cli", "status", "--json"],
        cwd=ROOT,
        env=settings_env(hub.settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    letters = _dead_letters_of(rabbitmq_url, boom_id, timeout=60)
    assert len(letters) == 1
    assert letters[0]["handler"] == "tests.support.example_handlers.always_raises"
    assert "handler bug triggered by" in str(letters[0]["error"])
    assert "RuntimeError" in str(letters[0]["traceback"])
    assert count_rows(engine, device_prefix=boom_id) == 1  # stored before the handlers ran
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queues"][DEAD_LETTER_QUEUE] >= 1
