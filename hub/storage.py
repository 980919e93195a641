"""Storage schema and database access shared by the hub, the workers and the CLI.

Layer: core; imports only `hub.errors` and `hub.envelope`. No Celery, no asyncio.

SQLite in the data folder by default, PostgreSQL by URL. The schema is created
and changed by Alembic migrations (`hub/migrations`), never by `create_all`,
so a deployed database moves forward with the code.

Over 400 lines on purpose: the tables and the one function that stores a batch
into them (`store_envelopes`, with its state ordering) change together; the
ordering rules themselves live in hub/presence.py.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Index,
    String,
    TypeDecorator,
    bindparam,
    create_engine,
    delete,
    event,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hub.envelope import Envelope, Kind
from hub.presence import Stamp, merge_ordered, message_stamp, presence_since, presence_stamp

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime}


class Device(Base):
    """A device of the registry. The credential is stored as its SHA-256 only."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    credential_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _MessageColumns:
    envelope_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    device_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    stored_at: Mapped[datetime] = mapped_column(UtcDateTime)
    transport: Mapped[str] = mapped_column(String(16))
    protocol: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryRow(Base):
    """One telemetry message, keyed by (received_at, envelope id): time-ordered.

    New rows land at the end of the key's index, so the cost of an insert does
    not grow with the table (a random key, the envelope id alone, touched any
    page of its index), and on PostgreSQL the key holds the partition key
    (docs/scaling.md, "Telemetry at fleet scale"). `received_at` is set once,
    by the hub that read the message, and travels in the envelope: a batch
    delivered again carries the same key and is ignored. A device's
    retransmission is a new envelope with the same id and a later
    `received_at`; `store_envelopes` finds it through (device_id, seq).
    """

    __tablename__ = "telemetry"
    __table_args__ = (
        Index("ix_telemetry_device_received", "device_id", "received_at"),
        Index("ix_telemetry_device_seq", "device_id", "seq"),
    )

    received_at: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    envelope_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    device_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    stored_at: Mapped[datetime] = mapped_column(UtcDateTime)
    transport: Mapped[str] = mapped_column(String(16))
    protocol: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class EventRow(_MessageColumns, Base):
    """One device event."""

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_device_received", "device_id", "received_at"),)


class StateReportRow(_MessageColumns, Base):
    """One state report: its id makes a retransmitted report change nothing."""

    __tablename__ = "state_reports"
    __table_args__ = (Index("ix_state_reports_device_received", "device_id", "received_at"),)


class DeviceState(Base):
    """Each device's last known state and presence."""

    __tablename__ = "device_state"
    __table_args__ = (Index("ix_device_state_updated_at", "updated_at"),)

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    transport: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The order each value and state key was set in, and of the newest presence
    # event applied (hub/presence.py): batches are stored in any order.
    last_values_at: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    state_at: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    presence_since: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    presence_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class CommandRow(Base):
    """A command to a device; `status` is pending until answered or expired.

    The row is the single source of truth for a command's fate: whoever moves
    it out of `pending` first (the device's answer or the expiry) writes the
    Celery result, so a late answer cannot overwrite an expiry.
    """

    __tablename__ = "commands"
    __table_args__ = (
        Index("ix_commands_device_status", "device_id", "status"),
        Index("ix_commands_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class DeviceConnection(Base):
    """Which hub process holds a device's connection right now."""

    __tablename__ = "device_connections"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hub_id: Mapped[str] = mapped_column(String(64))
    transport: Mapped[str] = mapped_column(String(16))
    connected_at: Mapped[datetime] = mapped_column(UtcDateTime)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the hub, workers and the CLI read while one of them writes; the
    # busy timeout makes concurrent writers wait instead of failing.
    cursor = dbapi_connection.cursor()
    # The busy timeout first: switching a fresh file to WAL needs its lock too,
    # and several processes may open a new database at the same moment.
    cursor.execute("PRAGMA busy_timeout=30000")
    _switch_to_wal(cursor)
    # FULL, not NORMAL: a worker acknowledges its task message to the broker
    # right after the commit, so the commit must survive a power loss too
    # (under NORMAL a WAL commit may be rolled back by one). The cost is one
    # fsync per committed batch; see docs/delivery.md.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _switch_to_wal(cursor: Any, patience_s: float = 30.0) -> None:
    """Put the database in WAL mode, waiting out a writer that holds its lock.

    SQLite answers "database is locked" at once, without calling the busy
    handler, when this connection would have to upgrade its read lock while
    another holds the write lock (the deadlock rule): exactly what happens when
    several processes open a fresh file while one of them migrates it. The mode
    is stored in the file, so a connection that finds it already set is done.
    """
    deadline = time.monotonic() + patience_s
    pause = 0.005
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


#: Connections an engine keeps open by default (`database_pool_size`).
DEFAULT_POOL_SIZE = 5


def make_engine(url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout, and its folder is created.

    `pool_size` connections stay open (PostgreSQL), and as many again may be
    opened for a burst; a worker process uses one per task it runs at once.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, json_serializer=_dumps)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        json_serializer=_dumps,
    )


#: Compact JSON, made once: json.dumps with separators builds an encoder per call.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _dumps(value: Any, default: Any = None) -> str:
    if default is None:
        return _ENCODE(value)
    return json.dumps(value, separators=(",", ":"), default=default)


#: The PostgreSQL advisory lock key that serialises migrations (any fixed
#: 64-bit number; this one is "hubmigr" in ASCII).
MIGRATION_LOCK_KEY = 0x6875626D696772


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to the newest schema (Alembic `upgrade head`),
    or to `revision` (tests of a migration start from the one before it).

    Safe when any number of hubs, workers, consoles and CLI commands call it
    at the same moment on the same database (docs/configuration.md, "Starting
    many processes at once"): the whole upgrade is one transaction that first
    takes a lock every migrating process waits on, so one migrates and the
    others then find the schema at head and change nothing.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Alembic configures logging from its ini file; we have none and keep ours.
    config.attributes["configure_logger"] = False
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        _begin_immediate(engine)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Held until this transaction ends (commit or rollback), so it
                # can never outlive the migration, even if the process dies.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            config.attributes["connection"] = connection
            # One chain of revisions: "head" fails loudly if two ever branch.
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def _begin_immediate(engine: Engine) -> None:
    """Make each transaction of this SQLite engine take the write lock at BEGIN.

    Python's sqlite3 opens no transaction before DDL, so without this every
    CREATE TABLE of a migration would commit on its own and two processes
    would both find the table missing. BEGIN IMMEDIATE makes the upgrade one
    transaction that holds the database's write lock from the start; the
    others wait on the busy timeout, then read the new version (the SQLAlchemy
    recipe for pysqlite transactions).
    """

    def no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", no_implicit_transactions)
    event.listen(engine, "begin", begin)


def insert_ignore(engine: Engine, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING into `table` on this engine's database."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"database {engine.dialect.name} is not supported")


_insert_ignore = insert_ignore  # the name hub.commands imports


def _row(env: Envelope, now: datetime) -> dict[str, Any]:
    return {
        "envelope_id": env.id,
        "device_id": env.device_id,
        "seq": env.seq,
        "device_time": env.device_time,
        "received_at": env.received_at,
        "stored_at": now,
        "transport": env.transport,
        "protocol": env.protocol,
        "payload": dict(env.payload),
    }


def _insert_new(conn: Any, table: Any, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the rows that are not there yet, in one statement; their envelope ids.

    RETURNING names the rows that were new, so that a retransmission leaves
    the device's state alone.
    """
    return {key[0] for key in _insert_returning_keys(conn, table, rows)}


def _insert_returning_keys(
    conn: Any, table: Any, rows: list[dict[str, Any]]
) -> list[tuple[str, datetime]]:
    """One multi-row INSERT ... ON CONFLICT DO NOTHING; (envelope id, received_at)
    of each row that was new.

    On PostgreSQL the batch travels as one JSON parameter
    (`json_populate_recordset`): SQLAlchemy's multi-row VALUES with RETURNING
    makes psycopg parse a statement of thousands of placeholders per batch,
    which halved the rows stored per second.
    """
    if conn.dialect.name == "postgresql":
        columns = ", ".join(column.name for column in table.columns)
        statement = text(
            f"INSERT INTO {table.name} ({columns}) "
            f"SELECT {columns} FROM json_populate_recordset(NULL::{table.name}, :rows) "
            "ON CONFLICT DO NOTHING RETURNING envelope_id, received_at"
        ).columns(envelope_id=String, received_at=UtcDateTime)
        found = conn.execute(statement, {"rows": _dumps(rows, _iso)})
        return [(row[0], row[1]) for row in found]
    return _sqlite_insert_returning_keys(conn, table, rows)


#: Host parameters one SQLite statement may hold (SQLITE_MAX_VARIABLE_NUMBER
#: since SQLite 3.32; Python's sqlite3 links a newer one).
_SQLITE_MAX_PARAMETERS = 32766


def _sqlite_time(value: datetime | None) -> str | None:
    """A datetime as SQLAlchemy's SQLite DATETIME stores a `UtcDateTime`:
    UTC, `YYYY-MM-DD HH:MM:SS.ffffff`, no zone (tests/unit/test_storage.py)."""
    if value is None:
        return None
    # In UTC the ISO text always ends in "+00:00"; cutting it is the cheapest
    # way to the zone-less text (replace(tzinfo=None) costs as much again).
    return value.astimezone(UTC).isoformat(" ", "microseconds")[:-6]


def _sqlite_converters(table: Any) -> list[tuple[str, Callable[[Any], Any] | None]]:
    """Each column of `table` with what turns a row's value into what SQLite stores."""
    converters: list[tuple[str, Callable[[Any], Any] | None]] = []
    for column in table.columns:
        if isinstance(column.type, UtcDateTime):
            converters.append((column.name, _sqlite_time))
        elif isinstance(column.type, JSON):
            converters.append((column.name, _dumps))
        else:
            converters.append((column.name, None))
    return converters


def _sqlite_insert_returning_keys(
    conn: Any, table: Any, rows: list[dict[str, Any]]
) -> list[tuple[str, datetime]]:
    """The SQLite side of `_insert_returning_keys`: multi-row VALUES bound by
    the driver itself.

    SQLAlchemy's insert of the same rows ran every value through its type's
    bind processor in Python, which cost more than SQLite storing the row. The
    values here are converted to exactly what those processors give (text
    times, compact JSON), so the stored text, and with it the key a batch
    delivered again must collide with, is the same; what the driver refuses
    (an integer beyond 64 bits, a string it cannot encode) it still refuses.
    """
    converters = _sqlite_converters(table)
    columns = ", ".join(name for name, _ in converters)
    chunk = _SQLITE_MAX_PARAMETERS // len(converters)
    keys: list[tuple[str, datetime]] = []
    times: dict[datetime, str | None] = {}  # stored_at is one time for the whole batch
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        values: list[Any] = []
        by_key: dict[tuple[str, str | None], datetime] = {}
        for row in part:
            for name, convert in converters:
                value = row[name]
                if value is None or convert is None:
                    values.append(value)
                elif convert is _sqlite_time:
                    text = times.get(value)
                    if text is None:
                        text = times[value] = _sqlite_time(value)
                    values.append(text)
                else:
                    values.append(convert(value))
            at = row["received_at"]
            by_key[(row["envelope_id"], times[at])] = at
        placeholders = "(" + ", ".join("?" * len(converters)) + ")"
        found = conn.exec_driver_sql(
            f"INSERT INTO {table.name} ({columns}) VALUES "
            + ", ".join([placeholders] * len(part))
            + " ON CONFLICT DO NOTHING RETURNING envelope_id, received_at",
            tuple(values),
        ).all()
        keys += [(envelope_id, by_key[(envelope_id, at)]) for envelope_id, at in found]
    return keys


#: How long after a message a device's retransmission of it is still recognised
#: by default (`retransmission_window_h`): the lookback of `_insert_telemetry`.
DEFAULT_RETRANSMISSION_WINDOW = timedelta(hours=24)

#: The first key of the advisory locks `_insert_telemetry` takes per device on
#: PostgreSQL ("hubd" in ASCII); the second is a hash of the device id.
DEVICE_LOCK_CLASS = 0x68756264


def _device_lock_key(device_id: str) -> int:
    digest = hashlib.blake2b(device_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _insert_telemetry(conn: Any, rows: list[dict[str, Any]], window: timedelta) -> set[str]:
    """Insert telemetry rows once per envelope id; the ids that were new.

    The key (received_at, envelope_id) catches a batch delivered again (its
    envelopes, and so their keys, are the same). A device's retransmission is
    a new envelope: same id (device, boot, seq), later `received_at`. After
    the insert, each new row with a sequence number is looked up by
    (device_id, seq) among the rows of the last `window`; if another row has
    its id, the one inserted here is deleted again. The row already there
    wins, even if it is the later one; within one batch the earliest copy
    wins. On PostgreSQL the lookup runs under an advisory lock per device
    (taken in key order, held until commit), so two workers storing copies of
    one message at the same moment see each other's: the second waits for the
    first's commit. SQLite has one writer at a time.
    """
    table: Any = TelemetryRow.__table__
    inserted = _insert_returning_keys(conn, table, rows)
    if not inserted:
        return set()
    mine = set(inserted)
    by_key = {(row["envelope_id"], row["received_at"]): row for row in rows}
    # Each (device, seq, id) once: a row then matches at most one probe, and the
    # copies counted below are distinct rows.
    unique = {
        (row["device_id"], row["seq"], key[0])
        for key in inserted
        if (row := by_key.get(key)) is not None and row["seq"] is not None
    }
    probes = [{"d": d, "s": s, "e": e} for d, s, e in unique]
    if not probes:
        return {key[0] for key in inserted}
    since = min(key[1] for key in inserted) - window
    if conn.dialect.name == "postgresql":
        keys = sorted({_device_lock_key(p["d"]) for p in probes})
        conn.execute(
            text(
                "SELECT count(pg_advisory_xact_lock(:class, k)) FROM "
                "(SELECT k FROM unnest(CAST(:keys AS integer[])) AS k ORDER BY k) AS ordered"
            ),
            {"class": DEVICE_LOCK_CLASS, "keys": keys},
        )
        source = (
            "json_to_recordset(CAST(:probes AS json)) AS p(d text, s bigint, e text) "
            "JOIN telemetry AS t ON t.device_id = p.d AND t.seq = p.s AND t.envelope_id = p.e"
        )
    else:
        source = (
            # INDEXED BY: SQLite's planner otherwise takes (device_id, received_at)
            # and reads every row of the device in the window.
            "json_each(:probes) AS p JOIN telemetry AS t INDEXED BY ix_telemetry_device_seq "
            "ON t.device_id = json_extract(p.value, '$.d') "
            "AND t.seq = json_extract(p.value, '$.s') "
            "AND t.envelope_id = json_extract(p.value, '$.e')"
        )
    # Only the ids found more than once come back: every new row finds itself,
    # and reading those back cost more than the lookup.
    found = conn.execute(
        text(
            "SELECT envelope_id, received_at FROM ("
            "SELECT t.envelope_id, t.received_at, "
            "count(*) OVER (PARTITION BY t.envelope_id) AS copies "
            f"FROM {source} WHERE t.received_at >= :since"
            ") AS found WHERE copies > 1"
        )
        .columns(envelope_id=String, received_at=UtcDateTime)
        .bindparams(bindparam("since", since, type_=UtcDateTime)),
        {"probes": _dumps(probes)},
    ).all()
    copies: dict[str, list[tuple[datetime, bool]]] = {}
    for envelope_id, received_at in found:
        copies.setdefault(envelope_id, []).append((received_at, (envelope_id, received_at) in mine))
    doomed: list[tuple[str, datetime]] = []
    for envelope_id, found_copies in copies.items():
        if len(found_copies) < 2:
            continue
        # Keep a copy that was there before; else (all ours) the earliest.
        keep = min(found_copies, key=lambda copy: (copy[1], copy[0]))
        doomed += [(envelope_id, at) for at, ours in found_copies if ours and (at, ours) != keep]
    if doomed:
        conn.execute(
            delete(table).where(
                table.c.received_at == bindparam("b_at"),
                table.c.envelope_id == bindparam("b_id"),
            ),
            [{"b_at": at, "b_id": envelope_id} for envelope_id, at in doomed],
        )
    gone = set(doomed)
    return {key[0] for key in inserted if key not in gone}


class HandlerRunRow(Base):
    """A handler run that ran to the end (tasks/handlers.py): a second delivery of
    the same (envelope, handler) is skipped. Written in the run's transaction."""

    __tablename__ = "handler_runs"

    envelope_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    handler: Mapped[str] = mapped_column(String(255), primary_key=True)
    ran_at: Mapped[datetime] = mapped_column(UtcDateTime)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def store_envelopes(
    engine: Engine,
    envelopes: Sequence[Envelope],
    *,
    before_commit: Callable[[list[Envelope]], object] | None = None,
    retransmission_window: timedelta = DEFAULT_RETRANSMISSION_WINDOW,
    count_stored: Callable[[Any, int], object] | None = None,
) -> int:
    """Store a batch in one transaction, idempotently on the envelope id.

    Telemetry, events and state reports get a row each (a retransmission is
    ignored); every device seen gets its state row updated: last values, state
    reports, presence, each in the order of hub/presence.py, whatever order
    batches are stored in. A telemetry message or state report that was stored
    before changes nothing. Returns how many telemetry and event rows were new.

    `before_commit` is called inside the transaction with the envelopes that
    are new: telemetry, events and state reports not stored before (each id
    once), and every envelope of the kinds that keep no row. A redelivered batch
    or a retransmission is then processed once; if the callback raises, nothing
    is stored. (Called before the commit, so that a crash in between means
    processing twice, never not at all.)

    A device's retransmission of a telemetry message is recognised within
    `retransmission_window` of the copy stored first (`_insert_telemetry`).

    `count_stored(connection, n)` is called last in the transaction when `n`
    rows were new (the worker's counter, hub/worker_metrics.py): the count
    commits with the rows, in the same commit. Last, so that a lock it takes
    on a counter row that other transactions share is held only for the commit.
    """
    now = datetime.now(UTC)
    telemetry = [_row(e, now) for e in envelopes if e.kind is Kind.TELEMETRY]
    events = [_row(e, now) for e in envelopes if e.kind is Kind.EVENT]
    states = [_row(e, now) for e in envelopes if e.kind is Kind.STATE]
    inserted = 0
    with engine.begin() as conn:
        new: set[str] = set()
        if telemetry:
            new_telemetry = _insert_telemetry(conn, telemetry, retransmission_window)
            inserted += len(new_telemetry)
            new |= new_telemetry
        if states:
            new |= _insert_new(conn, StateReportRow.__table__, states)
        if events:
            new_events = _insert_new(conn, EventRow.__table__, events)
            inserted += len(new_events)
            new |= new_events
        fresh = set(new)
        changes = []
        for e in envelopes:
            if e.kind not in (Kind.TELEMETRY, Kind.STATE, Kind.PRESENCE):
                continue  # events and command results are no state
            if e.kind is not Kind.PRESENCE:
                if e.id not in new:
                    continue
                # The first copy is the one stored; a second in the same batch is a resend.
                new.discard(e.id)
            changes.append(e)
        _update_state(conn, changes, now)
        if before_commit is not None:
            # Once per id: a retransmission can sit in the same batch as its original.
            handled: dict[str, Envelope] = {}
            for e in envelopes:
                if e.id in fresh or e.kind not in (Kind.TELEMETRY, Kind.EVENT, Kind.STATE):
                    handled.setdefault(e.id, e)
            if handled:
                before_commit(list(handled.values()))
        if count_stored is not None and inserted:
            count_stored(conn, inserted)
    return inserted


class _StateUpdate:
    """One device's state row while a batch is applied to it."""

    def __init__(self, row: Any) -> None:
        self.state: dict[str, Any] = dict(row.state) if row is not None else {}
        self.values: dict[str, Any] = dict(row.last_values) if row is not None else {}
        self.state_at: dict[str, Stamp] = dict(row.state_at or {}) if row is not None else {}
        self.values_at: dict[str, Stamp] = dict(row.last_values_at or {}) if row is not None else {}
        self.online = bool(row.online) if row is not None else False
        self.transport: str | None = row.transport if row is not None else None
        self.last_seen: datetime | None = row.last_seen_at if row is not None else None
        self.presence_since: datetime | None = row.presence_since if row is not None else None
        self.presence_at: datetime | None = row.presence_at if row is not None else None

    def seen(self, env: Envelope) -> None:
        if self.last_seen is None or env.received_at >= self.last_seen:
            self.last_seen = env.received_at
            self.transport = env.transport

    def apply(self, env: Envelope) -> None:
        if env.kind is Kind.PRESENCE:
            since = presence_since(env)
            stored = (
                presence_stamp(self.presence_since, self.presence_at)
                if self.presence_since is not None and self.presence_at is not None
                else ""
            )
            if presence_stamp(since, env.received_at) > stored:
                self.online = bool(env.payload.get("online", False))
                self.presence_since, self.presence_at = since, env.received_at
                # The newest connection's transport, even when a late event of an
                # older one was seen later (not for that late event itself).
                self.seen(env)
                self.transport = env.transport
            return
        self.seen(env)
        if env.kind is Kind.TELEMETRY:
            merge_ordered(self.values, self.values_at, dict(env.payload), message_stamp(env))
        else:
            merge_ordered(self.state, self.state_at, dict(env.payload), message_stamp(env))
        # A message says the device is online only if nothing newer said otherwise.
        if self.presence_at is None or env.received_at > self.presence_at:
            self.online = True

    def record(self, device_id: str, now: datetime) -> dict[str, Any]:
        return {
            "device_id": device_id,
            "state": self.state,
            "last_values": self.values,
            "online": self.online,
            "transport": self.transport,
            "last_seen_at": self.last_seen,
            "updated_at": now,
            "last_values_at": self.values_at,
            "state_at": self.state_at,
            "presence_since": self.presence_since,
            "presence_at": self.presence_at,
        }


def _update_state(conn: Any, envelopes: Iterable[Envelope], now: datetime) -> None:
    latest: dict[str, list[Envelope]] = {}
    for env in envelopes:
        latest.setdefault(env.device_id, []).append(env)
    if not latest:
        return
    table = DeviceState.__table__
    existing = {
        row.device_id: row
        for row in conn.execute(select(table).where(table.c.device_id.in_(list(latest))))
    }
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    # In device order: two workers updating the same devices then lock their
    # rows in the same order and never deadlock on each other.
    for device_id, envs in sorted(latest.items()):
        row = existing.get(device_id)
        device = _StateUpdate(row)
        # Presence first: a message's "online" is judged against the newest presence.
        for env in sorted(envs, key=lambda e: (e.kind is not Kind.PRESENCE, e.received_at)):
            device.apply(env)
        record = device.record(device_id, now)
        if row is None:
            inserts.append(record)
        else:
            updates.append({f"b_{key}": value for key, value in record.items()})
    # One statement each for new and known devices (executemany), not one per device.
    if inserts:
        conn.execute(insert_ignore(conn.engine, table), inserts)
    if updates:
        columns = [key for key in updates[0] if key != "b_device_id"]
        conn.execute(
            update(DeviceState)
            .where(DeviceState.device_id == bindparam("b_device_id"))
            .values({key[2:]: bindparam(key) for key in columns}),
            updates,
        )


def recent_telemetry(engine: Engine, device_id: str, last: int = 10) -> list[dict[str, Any]]:
    """The newest `last` telemetry rows of a device, oldest first."""
    table = TelemetryRow.__table__
    query = (
        select(table)
        .where(table.c.device_id == device_id)
        .order_by(table.c.received_at.desc(), table.c.seq.desc())
        .limit(last)
    )
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    return list(reversed(rows))


def device_state(engine: Engine, device_id: str) -> dict[str, Any] | None:
    table = DeviceState.__table__
    with engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.device_id == device_id)).first()
    return dict(row._mapping) if row is not None else None


def count_rows(engine: Engine, kind: Kind = Kind.TELEMETRY, device_prefix: str = "") -> int:
    """How many stored rows of `kind` belong to devices whose id starts with the prefix."""
    from sqlalchemy import func

    table = (TelemetryRow if kind is Kind.TELEMETRY else EventRow).__table__
    query = select(func.count()).select_from(table)
    if device_prefix:
        query = query.where(table.c.device_id.startswith(device_prefix, autoescape=True))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())
