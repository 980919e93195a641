"""The baseline's Celery app: what a user writes by hand, one task and one row per device message.

Layer: benchmarks; may import anything.

`celery -A bench.baseline_tasks worker -Q bench.baseline` runs it. The
baseline servers (`bench.baseline_tcp`, `bench.baseline_mqtt`) call
`store_reading.delay(...)` once for every device message. The task inserts
one row into its own table, `bench_baseline_readings`, which has the same
time columns as the hub's telemetry table so that both are measured by the
same queries.

Given the baseline's due: a pooled database engine (not a connection per
task), the same SQLite settings as the hub (WAL, synchronous=NORMAL), results
ignored, JSON, and the same worker options as the hub's worker. Publisher
confirms are on unless `BENCH_BASELINE_CONFIRMS=0`, so that a device is
acknowledged only once RabbitMQ holds its message, as with the hub.

Configured by environment: `BENCH_BASELINE_BROKER_URL`,
`BENCH_BASELINE_DATABASE_URL`, `BENCH_BASELINE_CONFIRMS`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite

from hub.storage import UtcDateTime

QUEUE = "bench.baseline"
TASK_NAME = "bench.baseline.store_reading"
TABLE_NAME = "bench_baseline_readings"

BROKER_URL = os.environ.get("BENCH_BASELINE_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
DATABASE_URL = os.environ.get("BENCH_BASELINE_DATABASE_URL", "sqlite:///baseline.sqlite3")
CONFIRMS = os.environ.get("BENCH_BASELINE_CONFIRMS", "1") != "0"

metadata = MetaData()

readings = Table(
    TABLE_NAME,
    metadata,
    # device id, boot id and seq: a resent message is stored once, as with the hub.
    Column("id", String(200), primary_key=True),
    Column("device_id", String(128), nullable=False),
    Column("seq", BigInteger),
    Column("device_time", UtcDateTime, nullable=True),
    Column("received_at", UtcDateTime, nullable=False),
    Column("stored_at", UtcDateTime, nullable=False),
    Column("payload", JSON),
)

app = Celery("bench_baseline", set_as_current=False)
app.conf.update(
    broker_url=BROKER_URL,
    broker_transport_options={"confirm_publish": CONFIRMS},
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE, durable=True)],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_delivery_mode="persistent",
    # The same delivery options as the hub's worker (tasks/app.py).
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """A pooled engine; SQLite gets the hub's pragmas."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def create_table(url: str) -> None:
    engine = make_engine(url)
    try:
        metadata.create_all(engine, checkfirst=True)
    finally:
        engine.dispose()


_engine: Engine | None = None
_engine_pid = 0
_insert: Any = None


def _db() -> tuple[Engine, Any]:
    global _engine, _engine_pid, _insert
    if _engine is None or _engine_pid != os.getpid():
        _engine = make_engine(DATABASE_URL)
        _engine_pid = os.getpid()
        dialect = postgresql if _engine.dialect.name == "postgresql" else sqlite
        _insert = dialect.insert(readings).on_conflict_do_nothing()
    return _engine, _insert


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]  # Celery is untyped
def store_reading(
    device_id: str,
    boot_id: int,
    seq: int,
    device_time: str | None,
    received_at: str,
    payload: dict[str, Any],
) -> None:
    """Store one device message as one row, in its own transaction."""
    engine, insert = _db()
    row = {
        "id": f"{device_id}:{boot_id}:{seq}",
        "device_id": device_id,
        "seq": seq,
        "device_time": _time(device_time),
        "received_at": _time(received_at),
        "stored_at": datetime.now(UTC),
        "payload": payload,
    }
    with engine.begin() as conn:
        conn.execute(insert, [row])
