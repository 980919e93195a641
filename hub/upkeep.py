"""Periodic upkeep of the database: telemetry partitions, retention, and the lease
that lets one process of the whole fleet do it at a time.

Layer: core; imports only `hub.storage` and `hub.commands`. No Celery, no asyncio,
no threads (the workers' runner is tasks/upkeep.py).

On PostgreSQL, `telemetry` is partitioned by range of `received_at`, one
partition per UTC day (`telemetry_pYYYYMMDD`), plus a default partition
(`telemetry_default`) that takes any row no day partition covers, so no
insert is ever refused. `ensure_partitions` creates the days ahead; a day
whose rows already went to the default partition (no upkeep ran for a while)
is created by moving them out of it. Retention drops whole day partitions
whose every row is older than the cut-off: no row-by-row delete, no bloat,
no vacuum. On SQLite it deletes rows in batches, each its own short
transaction, so that the hub's writers wait at most one batch.

The work runs once per `maintenance_interval_s` across the fleet, however
many workers run it: each first claims the lease row of the job
(`claim_lease`), a single conditional UPDATE that exactly one process wins
per interval, on both engines. docs/scaling.md, "Telemetry at fleet scale".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Engine, String, delete, literal_column, select, text, tuple_, update
from sqlalchemy.orm import Mapped, mapped_column

from hub.commands import OPEN
from hub.storage import (
    MIGRATION_LOCK_KEY,
    Base,
    CommandRow,
    HandlerRunRow,
    TelemetryRow,
    UtcDateTime,
    insert_ignore,
)

#: Day partitions created ahead of today (and one behind, for clocks a little late).
PARTITION_DAYS_AHEAD = 3
DEFAULT_PARTITION = "telemetry_default"
_PARTITION_NAME = re.compile(r"^telemetry_p(\d{8})$")
#: Rows one retention delete removes on SQLite before it commits and lets others write.
DELETE_BATCH_ROWS = 5000
#: The lease of the whole upkeep round (`run_upkeep`).
UPKEEP_LEASE = "upkeep"


class MaintenanceLease(Base):
    """When a periodic job last ran, and by whom: the row `claim_lease` updates."""

    __tablename__ = "maintenance_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_run_at: Mapped[datetime] = mapped_column(UtcDateTime)
    holder: Mapped[str] = mapped_column(String(255))


def partition_name(day: date) -> str:
    return f"telemetry_p{day:%Y%m%d}"


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def telemetry_partitions(conn: Any) -> dict[str, date]:
    """The day partitions of `telemetry` (PostgreSQL): name -> day."""
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'telemetry'::regclass"
        )
    )
    found = {}
    for (name,) in rows:
        match = _PARTITION_NAME.match(name)
        if match:
            found[name] = datetime.strptime(match.group(1), "%Y%m%d").date()
    return found


def create_default_partition(conn: Any) -> None:
    conn.execute(
        text(f"CREATE TABLE IF NOT EXISTS {DEFAULT_PARTITION} PARTITION OF telemetry DEFAULT")
    )


def ensure_partitions(conn: Any, days: list[date]) -> list[str]:
    """Create the day partitions of `days` that do not exist; the names created.

    Runs in the caller's transaction, under the migration lock (a worker's
    upkeep and a migrating process never create the same table twice). A day
    with rows in the default partition gets a table of its own filled from
    it, then attached: PostgreSQL refuses a plain CREATE ... PARTITION OF
    while the default partition holds rows of the new range.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    existing = telemetry_partitions(conn)
    created = []
    for day in sorted(set(days)):
        name = partition_name(day)
        if name in existing:
            continue
        bounds = {"lo": _day_start(day), "hi": _day_start(day + timedelta(days=1))}
        values = f"FOR VALUES FROM ('{bounds['lo'].isoformat()}') TO ('{bounds['hi'].isoformat()}')"
        stray = conn.execute(
            text(
                f"SELECT 1 FROM {DEFAULT_PARTITION} "
                "WHERE received_at >= :lo AND received_at < :hi LIMIT 1"
            ),
            bounds,
        ).first()
        if stray is None:
            conn.execute(text(f"CREATE TABLE {name} PARTITION OF telemetry {values}"))
        else:
            conn.execute(text(f"CREATE TABLE {name} (LIKE telemetry INCLUDING ALL)"))
            where = "WHERE received_at >= :lo AND received_at < :hi"
            conn.execute(
                text(f"INSERT INTO {name} SELECT * FROM {DEFAULT_PARTITION} {where}"), bounds
            )
            conn.execute(text(f"DELETE FROM {DEFAULT_PARTITION} {where}"), bounds)
            conn.execute(text(f"ALTER TABLE telemetry ATTACH PARTITION {name} {values}"))
        created.append(name)
    return created


def upcoming_days(now: datetime, ahead: int = PARTITION_DAYS_AHEAD) -> list[date]:
    today = now.astimezone(UTC).date()
    return [today + timedelta(days=n) for n in range(-1, ahead + 1)]


@dataclass(frozen=True, slots=True)
class Retention:
    """How many days each kind of row is kept (0: forever)."""

    telemetry_days: int = 0
    handler_runs_days: int = 0
    commands_days: int = 0


@dataclass(slots=True)
class UpkeepReport:
    """What one upkeep round did."""

    partitions_created: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)
    rows_deleted: dict[str, int] = field(default_factory=dict)


def drop_old_partitions(conn: Any, cutoff: datetime) -> list[str]:
    """Drop the day partitions whose every row is older than `cutoff`; their names.

    A partition that straddles the cut-off is kept whole (at most a day more
    than asked); the default partition's old rows are deleted.
    """
    dropped = []
    for name, day in sorted(telemetry_partitions(conn).items(), key=lambda item: item[1]):
        if _day_start(day + timedelta(days=1)) <= cutoff:
            conn.execute(text(f"DROP TABLE {name}"))
            dropped.append(name)
    conn.execute(
        text(f"DELETE FROM {DEFAULT_PARTITION} WHERE received_at < :cutoff"), {"cutoff": cutoff}
    )
    return dropped


def delete_in_batches(
    engine: Engine, table: Any, column: Any, cutoff: datetime, *, extra: Any = None
) -> int:
    """Delete rows whose `column` is older than `cutoff`, `DELETE_BATCH_ROWS` per
    transaction; how many. (`extra`: a further condition.)"""
    condition = column < cutoff
    if extra is not None:
        condition = condition & extra
    if engine.dialect.name == "sqlite":
        rowid: Any = literal_column("rowid")
        victims: Any = rowid.in_(
            select(rowid).select_from(table).where(condition).limit(DELETE_BATCH_ROWS)
        )
    else:
        key = tuple_(*table.primary_key.columns)
        victims = key.in_(
            select(*table.primary_key.columns).where(condition).limit(DELETE_BATCH_ROWS)
        )
    total = 0
    while True:
        with engine.begin() as conn:
            done = int(conn.execute(delete(table).where(victims)).rowcount)
        total += done
        if done < DELETE_BATCH_ROWS:
            return total


def enforce_retention(engine: Engine, retention: Retention, now: datetime) -> UpkeepReport:
    """Remove what is older than the retention of its kind."""
    report = UpkeepReport()
    if retention.telemetry_days:
        cutoff = now - timedelta(days=retention.telemetry_days)
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                _bounded_lock_wait(conn)
                report.partitions_dropped = drop_old_partitions(conn, cutoff)
        else:
            table = TelemetryRow.__table__
            report.rows_deleted["telemetry"] = delete_in_batches(
                engine, table, table.c.received_at, cutoff
            )
    if retention.handler_runs_days:
        table = HandlerRunRow.__table__
        report.rows_deleted["handler_runs"] = delete_in_batches(
            engine, table, table.c.ran_at, now - timedelta(days=retention.handler_runs_days)
        )
    if retention.commands_days:
        table = CommandRow.__table__
        report.rows_deleted["commands"] = delete_in_batches(
            engine,
            table,
            table.c.finished_at,
            now - timedelta(days=retention.commands_days),
            extra=table.c.status.not_in(OPEN),
        )
    return report


def claim_lease(engine: Engine, name: str, interval: timedelta, holder: str, now: datetime) -> bool:
    """True for exactly one caller per `interval` of job `name`, across every process.

    One conditional UPDATE (an INSERT the first time): on PostgreSQL a second
    process at the same moment waits for the first's row lock (or its new
    row), then finds the condition false (or the row there); SQLite has one
    writer at a time.
    """
    table: Any = MaintenanceLease.__table__
    # The write first: on SQLite a transaction that read before it writes fails
    # at once ("locked") if another connection committed in between.
    # RETURNING, not rowcount: psycopg reports no row count for an INSERT here.
    with engine.begin() as conn:
        claimed = conn.execute(
            update(table)
            .where(table.c.name == name, table.c.last_run_at <= now - interval)
            .values(last_run_at=now, holder=holder)
            .returning(table.c.name)
        ).first()
        if claimed is None:
            # The job's first run ever, or not due: an existing row makes this a no-op.
            claimed = conn.execute(
                insert_ignore(engine, table)
                .values(name=name, last_run_at=now, holder=holder)
                .returning(table.c.name)
            ).first()
    return claimed is not None


#: How long an upkeep statement waits for a table lock before it gives up.
UPKEEP_LOCK_TIMEOUT = "10s"


def _bounded_lock_wait(conn: Any) -> None:
    """Give up (an error; the next round tries again) rather than wait long for a lock.

    Creating and dropping a partition locks `telemetry` itself; a statement
    waiting for that lock would queue every worker's insert behind it.
    """
    conn.execute(text(f"SET LOCAL lock_timeout = '{UPKEEP_LOCK_TIMEOUT}'"))


def run_upkeep(engine: Engine, retention: Retention, now: datetime | None = None) -> UpkeepReport:
    """Create the coming partitions (PostgreSQL), then enforce the retention."""
    now = now or datetime.now(UTC)
    created: list[str] = []
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            _bounded_lock_wait(conn)
            created = ensure_partitions(conn, upcoming_days(now))
    report = enforce_retention(engine, retention, now)
    report.partitions_created = created
    return report
