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
from sqlalchemy import Engine

from firmware_sim.fleet import FleetOptions, run_fleet
from hub import dead_letters
from hub.commands import SUCCEEDED
from hub.protocol.events import Ack, Command, CommandResult
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


def _dead_letters_of(engine: Engine, device_id: str) -> list[dict[str, object]]:
    return [
        dead_letters.get_dead_letter(engine, str(row["id"]))
        for row in dead_letters.list_dead_letters(engine, status=None, limit=1000)
        if row["device_id"] == device_id
    ]


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
        run_fleet(
            FleetOptions(
                transport="tcp",
                host="127.0.0.1",
                port=hub.tcp_port,
                devices=[(d, creds[d]) for d in healthy],
                messages=100,
            )
        )
    )
    assert summary.acknowledged == 500
    assert wait_until(lambda: count_rows(engine, device_prefix=f"{device_prefix}ok-") == 500)

    # Three retries with backoff (0.5 + 1 + 2 s), then a dead letter in the database.
    assert wait_until(lambda: bool(_dead_letters_of(engine, boom_id)), timeout=60, interval=0.5)
    # The hub reads the workers' counters every few seconds.
    assert wait_until(
        lambda: hub.call_soon(hub.app.status)["workers"]["dead_letters"] >= 1, timeout=30
    )
    assert hub.app.http is not None
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "hubapp.cli",
            "status",
            "--json",
            "--url",
            f"http://127.0.0.1:{hub.app.http.port}/status",
        ],
        cwd=ROOT,
        env=settings_env(hub.settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    letters = _dead_letters_of(engine, boom_id)
    assert len(letters) == 1
    assert letters[0]["source"] == "tests.support.example_handlers.always_raises"
    assert letters[0]["reason"] == "handler_failed"
    assert letters[0]["attempts"] == 4
    assert "RuntimeError: handler bug triggered by" in str(letters[0]["error"])
    assert count_rows(engine, device_prefix=boom_id) == 1  # stored before the handlers ran
    assert status.returncode == 0, status.stderr
    workers = json.loads(status.stdout)["hub"]["workers"]
    assert workers["dead_letters"] >= 1
    assert workers["rows_stored"] >= 501
    assert workers["task_failures"] >= 4
    metrics = hub.call_soon(hub.app.metrics.render).decode()
    assert "hub_worker_dead_letters_total" in metrics
    assert 'hub_dead_letters{status="dead"}' in metrics
