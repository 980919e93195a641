"""Storing batches: idempotent rows and each device's last known state."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from hub.envelope import Envelope, Kind
from hub.storage import (
    EventRow,
    TelemetryRow,
    count_rows,
    device_state,
    make_engine,
    migrate,
    store_envelopes,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def env(device: str, kind: Kind, payload: dict[str, object], n: int) -> Envelope:
    return Envelope(
        device_id=device,
        kind=kind,
        payload=payload,
        transport="tcp",
        protocol="native",
        seq=n if kind is not Kind.PRESENCE else None,
        received_at=T0 + timedelta(seconds=n),
    )


def test_batches_store_once_and_keep_the_newest_state(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    first = [env("a", Kind.TELEMETRY, {"t": n, f"k{n}": n}, n) for n in range(1, 4)]
    first += [env("b", Kind.TELEMETRY, {"t": 10}, 1), env("b", Kind.STATE, {"fw": "1.0"}, 2)]
    assert store_envelopes(engine, first) == 4
    assert store_envelopes(engine, first) == 0  # a redelivered batch adds nothing

    later = [
        env("a", Kind.TELEMETRY, {"t": 99}, 7),
        env("b", Kind.PRESENCE, {"online": False}, 9),
        env("c", Kind.EVENT, {"alarm": True}, 1),
    ]
    assert store_envelopes(engine, later) == 2

    a = device_state(engine, "a")
    assert a is not None
    assert a["last_values"] == {"t": 99, "k1": 1, "k2": 2, "k3": 3}
    assert a["online"] and a["last_seen_at"] == T0 + timedelta(seconds=7)
    b = device_state(engine, "b")
    assert b is not None
    assert b["state"] == {"fw": "1.0"} and b["last_values"] == {"t": 10}
    assert b["online"] is False
    assert device_state(engine, "c") is None  # events are not state
    assert count_rows(engine) == 5 and count_rows(engine, Kind.EVENT) == 1


MOMENTS = [
    T0,
    datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
    datetime(2026, 3, 4, 23, 30, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
    datetime(999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=2))),
]


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_sqlite_rows_are_written_as_sqlalchemy_writes_them(
    tmp_path: Path, moment: datetime
) -> None:
    """store_envelopes binds SQLite's values itself: the same text as SQLAlchemy's
    types give, or a batch delivered again would not collide with its first copy."""
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    payload = {"t": 21.5, "note": "é\ud800", "deep": {"a": [1, None, True]}, "big": 2**70}
    mine = [
        Envelope(
            device_id=f"dev-{kind.value}",
            kind=kind,
            payload=payload,
            transport="tcp",
            protocol="native",
            seq=7,
            device_time=moment,
            received_at=moment,
        )
        for kind in (Kind.TELEMETRY, Kind.EVENT)
    ]
    assert store_envelopes(engine, mine) == 2
    for table in (TelemetryRow.__table__, EventRow.__table__):
        with engine.begin() as conn:
            stored = dict(conn.execute(select(table)).one()._mapping)
            copy = {**stored, "envelope_id": "copy"}
            conn.execute(insert(table).values(copy))  # through SQLAlchemy's types
            texts = conn.execute(
                text(
                    f"SELECT received_at, device_time, stored_at, payload FROM {table.name} "
                    "ORDER BY envelope_id = 'copy'"
                )
            ).all()
        assert texts[0] == texts[1]
        assert stored["received_at"] == moment and stored["payload"] == payload
    # And SQLAlchemy finds the row by its key, bound through the key's type.
    table = TelemetryRow.__table__
    with engine.connect() as conn:
        found = conn.execute(
            select(table.c.envelope_id).where(
                table.c.received_at == moment, table.c.envelope_id == mine[0].id
            )
        ).all()
    assert len(found) == 1


def test_sqlite_commits_survive_a_power_loss(tmp_path: Path) -> None:
    # A worker acknowledges its task message right after the commit: the commit
    # must be synced (synchronous=FULL = 2), not only written (NORMAL = 1).
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite3'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_a_fresh_file_locked_by_a_writer_is_switched_to_wal_once_the_writer_commits(
    tmp_path: Path,
) -> None:
    # A second process opening a new database while the first migrates it: the
    # switch to WAL is refused at once (no busy handler), so it must be retried.
    path = tmp_path / "fresh.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (i INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, lambda: writer.execute("COMMIT")).start()

    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1
    finally:
        engine.dispose()
        writer.close()
