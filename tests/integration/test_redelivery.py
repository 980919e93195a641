"""A batch delivered twice (a publish whose confirm timed out and was spooled, a
worker killed before its ack, a device resending what it was not acknowledged
for) is stored once, and its handlers run once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery

from hub.envelope import Envelope, Kind
from tests.reliability.harness import (
    RECORDING_HANDLER,
    WorkerOptions,
    WorkerProcess,
    read_stored,
    wait_for,
)
from tests.support.services import amqp_url

pytestmark = pytest.mark.integration


def test_a_batch_delivered_twice_runs_its_handlers_once(
    rabbitmq_vhost: str, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    broker_url = amqp_url(rabbitmq_vhost)
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
        for _ in range(2):
            sender.send_task("tasks.ingest.telemetry", args=(batch,), queue="hub.telemetry")

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
