"""A batch delivered twice (a publish whose confirm timed out and was spooled, a
worker killed before its ack, a device resending what it was not acknowledged
for) is stored once, and its handlers run once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection

from hub.envelope import Envelope, Kind
from hub.routing import HANDLER_QUEUE
from tests.reliability.harness import (
    RECORDING_HANDLER,
    WorkerOptions,
    WorkerProcess,
    read_stored,
    wait_for,
)
from tests.support.services import amqp_url, create_vhost, delete_vhost

pytestmark = pytest.mark.integration


@pytest.fixture
def own_vhost() -> Iterator[str]:
    """A vhost of this test's own: the run's shared worker must not take its messages."""
    vhost = create_vhost()
    try:
        yield vhost
    finally:
        delete_vhost(vhost)


def test_a_batch_delivered_twice_runs_its_handlers_once(own_vhost: str, tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    broker_url = amqp_url(own_vhost)
    from hub.storage import migrate

    migrate(database_url)
    worker = WorkerProcess(
        WorkerOptions(broker_url, database_url, tmp_path / "w", handlers=(RECORDING_HANDLER,)),
        tmp_path / "worker.log",
    )
    try:
        device = f"rel-redeliver-{uuid.uuid4().hex[:6]}"
        batch = [
            Envelope(
                device_id=device,
                kind=Kind.TELEMETRY,
                payload={"n": seq},
                seq=seq,
                received_at=datetime.now(UTC),
                transport="tcp",
                protocol="native",
            ).to_dict()
            for seq in range(1, 6)
        ]
        sender = Celery("redelivery-test", broker=broker_url, set_as_current=False)
        # A retransmission in the same batch as its original (spooled batches are
        # merged on replay), then the whole batch delivered again.
        for body in (batch + batch[:2], batch):
            sender.send_task("tasks.ingest.telemetry", args=(body,), queue="hub.telemetry")

        def runs() -> int:
            return sum(read_stored(database_url, [device]).handler_runs.values())

        assert wait_for(lambda: runs() >= 5, 60), "the handlers never ran"
        # Give the second copy every chance to be processed too.
        wait_for(lambda: runs() > 5, 10)
        stored = read_stored(database_url, [device])
        assert len(stored.telemetry) == 5
        assert sorted(stored.handler_runs.values()) == [1] * 5
    finally:
        worker.stop()


def test_a_handler_run_delivered_twice_runs_once(own_vhost: str, tmp_path: Path) -> None:
    # A worker that ran a handler but whose ack was lost (RabbitMQ restarted, the
    # connection dropped) gets the same run again, with the same task id.
    database_url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    broker_url = amqp_url(own_vhost)
    from hub.storage import migrate

    migrate(database_url)
    worker = WorkerProcess(
        WorkerOptions(broker_url, database_url, tmp_path / "w", handlers=(RECORDING_HANDLER,)),
        tmp_path / "worker.log",
    )
    try:
        device = f"rel-rerun-{uuid.uuid4().hex[:6]}"
        envelope = Envelope(
            device_id=device,
            kind=Kind.TELEMETRY,
            payload={"n": 1},
            seq=1,
            transport="tcp",
            protocol="native",
        ).to_dict()
        sender = Celery("redelivery-test", broker=broker_url, set_as_current=False)
        run_id = uuid.uuid4().hex
        name = f"{RECORDING_HANDLER}.record"

        def runs() -> int:
            return sum(read_stored(database_url, [device]).handler_runs.values())

        sender.send_task(
            "tasks.handlers.run", args=(name, envelope), task_id=run_id, queue=HANDLER_QUEUE
        )
        assert wait_for(lambda: runs() >= 1, 60), "the handler never ran"
        sender.send_task(
            "tasks.handlers.run", args=(name, envelope), task_id=run_id, queue=HANDLER_QUEUE
        )
        # The same run scheduled again under another task id (a redelivered
        # batch schedules its runs anew): the ledger still says it ran.
        sender.send_task(
            "tasks.handlers.run",
            args=(name, envelope),
            task_id=uuid.uuid4().hex,
            queue=HANDLER_QUEUE,
        )
        wait_for(lambda: runs() > 1, 10)
        assert runs() == 1
    finally:
        worker.stop()


def test_a_batch_redelivered_after_it_was_stored_still_runs_its_handlers(
    own_vhost: str, tmp_path: Path
) -> None:
    # A worker killed after the batch's commit, before its handler runs left
    # (the local queue sends a task's publishes with its acknowledgement): the
    # batch comes back marked redelivered, finds everything stored, and must
    # still schedule the runs; the ledger keeps them to one each.
    database_url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    broker_url = amqp_url(own_vhost)
    from hub.storage import make_engine, migrate, store_envelopes

    migrate(database_url)
    device = f"rel-stored-{uuid.uuid4().hex[:6]}"
    envelopes = [
        Envelope(
            device_id=device,
            kind=Kind.TELEMETRY,
            payload={"n": seq},
            seq=seq,
            received_at=datetime.now(UTC),
            transport="tcp",
            protocol="native",
        )
        for seq in range(1, 6)
    ]
    engine = make_engine(database_url)
    try:
        # The first delivery's commit; one of its runs had happened too.
        assert store_envelopes(engine, envelopes) == 5
    finally:
        engine.dispose()
    sender = Celery("redelivery-test", broker=broker_url, set_as_current=False)
    sender.send_task(
        "tasks.ingest.telemetry",
        args=([e.to_dict() for e in envelopes],),
        queue="hub.telemetry",
    )
    # A consumer takes the message and goes away without acknowledging it:
    # RabbitMQ gives it back marked redelivered, as after a worker's SIGKILL.
    with Connection(broker_url) as conn:
        channel = conn.channel()
        taken = None
        deadline = time.monotonic() + 30
        while taken is None and time.monotonic() < deadline:
            taken = channel.basic_get(queue="hub.telemetry", no_ack=False)
            if taken is None:
                time.sleep(0.2)
        assert taken is not None, "the ingest task never reached its queue"
    worker = WorkerProcess(
        WorkerOptions(broker_url, database_url, tmp_path / "w", handlers=(RECORDING_HANDLER,)),
        tmp_path / "worker.log",
    )
    try:

        def runs() -> int:
            return sum(read_stored(database_url, [device]).handler_runs.values())

        assert wait_for(lambda: runs() >= 5, 60), (
            f"the handlers of a redelivered, already stored batch never ran ({runs()} of 5)"
        )
        wait_for(lambda: runs() > 5, 5)
        assert sorted(read_stored(database_url, [device]).handler_runs.values()) == [1] * 5
    finally:
        worker.stop()
