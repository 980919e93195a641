"""No single envelope or task message poisons a batch or a worker.

Real RabbitMQ (a vhost of this module's own), a real prefork `celery -A tasks
worker` with two pool processes, task messages published as the hub publishes
them, and some that no hub would send: an envelope nested 900 levels deep
(which Python's pickler cannot hand to a pool process), an invalid envelope,
a body that is not JSON, a body too deep for the JSON parser. The good
envelopes are stored, the bad ones become dead letters with their reason,
and the worker keeps the same processes throughout. Then the dead letters
through `hub dead-letters`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange
from sqlalchemy import Engine

from hub import dead_letters
from hub.envelope import Envelope, Kind
from hub.routing import QUEUES, task_routes
from hub.storage import count_rows, make_engine, migrate
from tasks.application import celery_queues
from tests.support.processes import ROOT, Worker, make_test_settings, settings_env, wait_until
from tests.support.services import amqp_url, create_vhost, delete_vhost

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()}


class Setup:
    def __init__(self, tmp: Path, broker_url: str) -> None:
        self.database_url = f"sqlite:///{tmp / 'hub.sqlite3'}"
        migrate(self.database_url)
        self.engine = make_engine(self.database_url)
        self.settings = make_test_settings(
            tmp / "data",
            broker_url=broker_url,
            database_url=self.database_url,
            handlers=("tests.support.example_handlers",),
        )
        self.worker = Worker(self.settings, tmp / "worker.log", concurrency=2)
        self.app = Celery("poison-test", set_as_current=False)
        self.app.conf.update(
            broker_url=broker_url,
            task_serializer="json",
            task_queues=celery_queues(self.settings),
            task_routes=task_routes(),
        )

    def close(self) -> None:
        self.worker.stop()
        self.engine.dispose()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    vhost = create_vhost()
    s: Setup | None = None
    try:
        s = Setup(tmp_path_factory.mktemp("poison"), amqp_url(vhost))
        yield s
    finally:
        if s is not None:
            s.close()
        delete_vhost(vhost)


def envelope(device_id: str, seq: int, payload: Any = None) -> dict[str, Any]:
    good = Envelope(
        device_id=device_id,
        kind=Kind.TELEMETRY,
        payload={"t": seq},
        transport="tcp",
        protocol="native",
        seq=seq,
        id=uuid.uuid4().hex,
    ).to_dict()
    if payload is not None:
        good["payload"] = payload
    return good


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def letters_of(engine: Engine, prefix: str) -> list[dict[str, Any]]:
    rows = dead_letters.list_dead_letters(engine, status=None, limit=1000)
    return [r for r in rows if (r["device_id"] or "").startswith(prefix)]


def publish_raw(setup: Setup, body: bytes, marker: str) -> None:
    """A task message with this body, as Celery's protocol 2 lays it out."""
    with Connection(setup.settings.broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            exchange=Exchange("hub", type="direct", durable=True),
            routing_key=QUEUES[Kind.TELEMETRY],
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "tasks.ingest.telemetry", "id": marker, "lang": "py"},
            delivery_mode=2,
        )


def test_a_deep_envelope_does_not_stop_the_worker_or_its_batch(setup: Setup) -> None:
    pid = setup.worker.process.pid
    pool = children(pid)
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    batch = [
        envelope(f"{prefix}good-1", 1),
        envelope(f"{prefix}deep-1", 2, nested(900)),
        {**envelope(f"{prefix}bad-1", 3), "seq": "three"},
        envelope(f"{prefix}good-2", 4),
    ]
    setup.app.send_task("tasks.ingest.telemetry", args=(batch,))

    assert wait_until(
        lambda: count_rows(setup.engine, Kind.TELEMETRY, f"{prefix}good-") == 2, timeout=60
    ), setup.worker.log_path.read_text()[-3000:]
    assert wait_until(lambda: len(letters_of(setup.engine, prefix)) == 2, timeout=30)
    reasons = {r["device_id"]: r["reason"] for r in letters_of(setup.engine, prefix)}
    assert reasons == {f"{prefix}deep-1": "too_deep", f"{prefix}bad-1": "invalid_envelope"}
    assert count_rows(setup.engine, Kind.TELEMETRY, prefix) == 2

    # The same worker and pool processes, and they still work.
    setup.app.send_task("tasks.ingest.telemetry", args=([envelope(f"{prefix}after-1", 5)],))
    assert wait_until(
        lambda: count_rows(setup.engine, Kind.TELEMETRY, f"{prefix}after-") == 1, timeout=60
    )
    assert setup.worker.process.poll() is None
    assert children(pid) == pool


def test_an_envelope_the_database_refuses_costs_only_itself(setup: Setup) -> None:
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    # Valid as an envelope, but no SQLite INTEGER holds a seq of 2**64.
    refused = {**envelope(f"{prefix}huge-1", 2), "seq": 2**64}
    batch = [envelope(f"{prefix}good-1", 1), refused, envelope(f"{prefix}good-2", 3)]
    setup.app.send_task("tasks.ingest.telemetry", args=(batch,))
    assert wait_until(
        lambda: count_rows(setup.engine, Kind.TELEMETRY, f"{prefix}good-") == 2, timeout=60
    ), setup.worker.log_path.read_text()[-3000:]
    assert wait_until(lambda: len(letters_of(setup.engine, prefix)) == 1, timeout=30)
    (letter,) = letters_of(setup.engine, prefix)
    assert (letter["device_id"], letter["reason"]) == (f"{prefix}huge-1", "store_failed")
    assert letter["replayable"] is True


@pytest.mark.parametrize(
    "body",
    [b"{this is not json", b"[" * 5000 + b"]" * 5000],
    ids=["not-json", "too-deep-to-parse"],
)
def test_an_undecodable_task_message_becomes_a_dead_letter(setup: Setup, body: bytes) -> None:
    pid = setup.worker.process.pid
    pool = children(pid)
    marker = uuid.uuid4().hex
    publish_raw(setup, body, marker)

    def recorded() -> list[dict[str, Any]]:
        rows = dead_letters.list_dead_letters(setup.engine, status=None, limit=1000)
        found = []
        for row in rows:
            if row["reason"] == "undecodable":
                full = dead_letters.get_dead_letter(setup.engine, row["id"])
                if full["payload"] == body.decode():
                    found.append(full)
        return found

    assert wait_until(lambda: bool(recorded()), timeout=60), setup.worker.log_path.read_text()[
        -3000:
    ]
    (letter,) = recorded()
    assert letter["source"] == "tasks.ingest.telemetry"
    assert letter["replayable"] is False
    prefix = f"u{uuid.uuid4().hex[:6]}-"
    setup.app.send_task("tasks.ingest.telemetry", args=([envelope(f"{prefix}after-1", 1)],))
    assert wait_until(lambda: count_rows(setup.engine, Kind.TELEMETRY, prefix) == 1, timeout=60)
    assert setup.worker.process.poll() is None
    assert children(pid) == pool


def test_a_message_for_an_unknown_task_becomes_a_dead_letter(setup: Setup) -> None:
    marker = uuid.uuid4().hex
    setup.app.send_task("tasks.ingest.no_such_task", args=([marker],), queue="hub.telemetry")

    def recorded() -> list[dict[str, Any]]:
        rows = dead_letters.list_dead_letters(setup.engine, status=None, limit=1000)
        return [
            r
            for r in rows
            if r["reason"] == "unknown_task"
            and marker in dead_letters.get_dead_letter(setup.engine, r["id"])["payload"]
        ]

    assert wait_until(lambda: bool(recorded()), timeout=60)
    assert recorded()[0]["source"] == "tasks.ingest.no_such_task"
    assert setup.worker.process.poll() is None


def hub_cli(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubapp.cli", "dead-letters", *args],
        cwd=ROOT,
        env=settings_env(setup.settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dead_letters_from_the_command_line(setup: Setup) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}-"
    # A handler that always raises: retried, then a dead letter with its traceback.
    boom = envelope(f"{prefix}boom-1", 1)
    setup.app.send_task("tasks.ingest.telemetry", args=([boom],))

    def handler_letters() -> list[dict[str, Any]]:
        return [r for r in letters_of(setup.engine, prefix) if r["reason"] == "handler_failed"]

    assert wait_until(lambda: len(handler_letters()) == 1, timeout=90)

    listed = hub_cli(setup, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["device_id"] == f"{prefix}boom-1"]
    assert row["source"] == "tests.support.example_handlers.always_raises"
    assert row["attempts"] == 4
    assert row["status"] == "dead"
    assert row["replayable"] is True

    text = hub_cli(setup, "list", "--status", "all")
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith(row["id"]))
    assert "handler_failed" in line
    assert "RuntimeError: handler bug triggered by" in line

    shown = hub_cli(setup, "show", row["id"])
    assert shown.returncode == 0, shown.stderr
    assert "RuntimeError: handler bug triggered by" in shown.stdout
    assert boom["id"] in shown.stdout

    # Replay sends the handler run again by task name; it fails again, for good.
    replayed = hub_cli(setup, "replay", row["id"])
    assert replayed.returncode == 0, replayed.stderr
    assert dead_letters.get_dead_letter(setup.engine, row["id"])["status"] == "replayed"
    assert wait_until(lambda: len(handler_letters()) == 2, timeout=90)
    again = hub_cli(setup, "replay", row["id"])
    assert again.returncode == 1
    assert "is replayed, not dead" in again.stderr

    newest = next(r for r in handler_letters() if r["status"] == "dead")
    discarded = hub_cli(setup, "discard", newest["id"])
    assert discarded.returncode == 0, discarded.stderr
    assert dead_letters.get_dead_letter(setup.engine, newest["id"])["status"] == "discarded"
    missing = hub_cli(setup, "show", "no-such-letter")
    assert missing.returncode == 1
    assert "no dead letter 'no-such-letter'" in missing.stderr
