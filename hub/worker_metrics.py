"""Worker counters, kept in the database so that the hub can show them.

Layer: core; imports only `hub.storage`. No Celery.

Workers are separate processes, often on other machines, and restart; a
counter in a worker's memory would die with it, and Prometheus multiprocess
mode needs a folder that every process shares, which workers on other
machines do not. The database is what every worker and every hub already
share, so each worker adds to its own rows (`worker_counters`, one row per
worker name and counter, so workers never contend for one row), and the
hub's `/metrics` and `hub status` read the sums. Stored rows are counted in
the transaction that stores them (`add_in`): no commit of their own, and
exact. The other counters are added after the fact, so a worker killed in
between under-counts; the counters are for watching, the stored rows are the
truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Connection, Engine, String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from hub.storage import Base, UtcDateTime

ROWS_STORED = "rows_stored"
HANDLER_RUNS = "handler_runs"
TASK_FAILURES = "task_failures"
DEAD_LETTERS = "dead_letters"
WORKER_STARTS = "worker_starts"
POOL_PROCESS_STARTS = "pool_process_starts"

#: Every counter, with its help text for Prometheus (`hub_worker_<name>_total`).
COUNTERS: dict[str, str] = {
    ROWS_STORED: "Telemetry and event rows stored by workers (new rows only)",
    HANDLER_RUNS: "User handler runs that completed",
    TASK_FAILURES: "Task runs that raised (retried or dead-lettered)",
    DEAD_LETTERS: "Dead letters recorded by workers",
    WORKER_STARTS: "Worker starts (`celery worker`, the first and every restart)",
    POOL_PROCESS_STARTS: "Worker pool processes started, replacements of dead ones included",
}


class WorkerCounter(Base):
    """One counter of one worker (the `worker_counters` table)."""

    __tablename__ = "worker_counters"

    worker: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


def add(engine: Engine, worker: str, counts: Mapping[str, int]) -> None:
    """Add `counts` to `worker`'s counters (an upsert per counter, one transaction)."""
    if any(counts.values()):
        with engine.begin() as conn:
            add_in(conn, worker, counts)


def add_in(conn: Connection, worker: str, counts: Mapping[str, int]) -> None:
    """`add` inside a transaction of the caller's, which commits the counts
    with what they count (the ingest tasks count the rows they store so)."""
    rows = [
        {"worker": worker[:200], "name": name, "value": int(n), "updated_at": datetime.now(UTC)}
        for name, n in counts.items()
        if n
    ]
    if not rows:
        return
    table = WorkerCounter.__table__
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(table)
    statement = insert.on_conflict_do_update(
        index_elements=[table.c.worker, table.c.name],
        set_={
            "value": table.c.value + insert.excluded.value,
            "updated_at": insert.excluded.updated_at,
        },
    )
    conn.execute(statement, rows)


def totals(engine: Engine) -> dict[str, int]:
    """Each counter summed over all workers (0 for a counter nobody has added to)."""
    table = WorkerCounter.__table__
    found = dict.fromkeys(COUNTERS, 0)
    with engine.connect() as conn:
        for name, value in conn.execute(
            select(table.c.name, func.sum(table.c.value)).group_by(table.c.name)
        ):
            found[str(name)] = int(value or 0)
    return found
