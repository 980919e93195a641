"""Telemetry partitioned by day on PostgreSQL, retention on both engines, the upkeep lease.

Real PostgreSQL, a database of each test's own (tests/support/postgres.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, text

import hub.upkeep
from hub.envelope import Envelope, Kind, envelope_id
from hub.settings import normalise_database_url
from hub.storage import (
    CommandRow,
    HandlerRunRow,
    count_rows,
    make_engine,
    migrate,
    store_envelopes,
)
from hub.upkeep import (
    DEFAULT_PARTITION,
    Retention,
    claim_lease,
    enforce_retention,
    ensure_partitions,
    partition_name,
    run_upkeep,
    telemetry_partitions,
)
from tests.support.postgres import postgres_database
from tests.support.processes import Worker, make_test_settings, wait_until

NOW = datetime.now(UTC).replace(microsecond=0)

pytestmark = pytest.mark.integration


def message(device: str, seq: int, received: datetime) -> Envelope:
    return Envelope(
        id=envelope_id(device, seq, boot_id=1),
        device_id=device,
        kind=Kind.TELEMETRY,
        payload={"t": seq},
        transport="tcp",
        protocol="native",
        seq=seq,
        received_at=received,
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield normalise_database_url(url)


@pytest.fixture
def pg(pg_url: str) -> Iterator[Engine]:
    migrate(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def rows_in(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def partitions(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        return dict(telemetry_partitions(conn))


def test_the_migration_partitions_telemetry_by_day_ahead_of_time(pg: Engine) -> None:
    with pg.connect() as conn:
        kind = conn.execute(
            text("SELECT relkind FROM pg_class WHERE relname = 'telemetry'")
        ).scalar_one()
        key = conn.execute(
            text(
                "SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_index i "
                "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = 'telemetry'::regclass AND i.indisprimary"
            )
        ).scalar_one()
    assert kind == "p"  # partitioned
    assert key == ["received_at", "envelope_id"]
    today = NOW.date()
    names = partitions(pg)
    for n in range(-1, hub.upkeep.PARTITION_DAYS_AHEAD + 1):
        assert partition_name(today + timedelta(days=n)) in names
    assert rows_in(pg, DEFAULT_PARTITION) == 0


def test_a_redelivered_batch_is_stored_once_across_partitions(pg: Engine) -> None:
    # One batch spanning midnight: its rows land in two partitions.
    midnight = datetime.combine(NOW.date(), datetime.min.time(), tzinfo=UTC)
    batch = [message("d", n, midnight + timedelta(seconds=n - 5)) for n in range(10)]
    assert store_envelopes(pg, batch) == 10
    assert store_envelopes(pg, batch) == 0
    assert count_rows(pg) == 10
    assert rows_in(pg, partition_name(NOW.date())) == 5
    assert rows_in(pg, partition_name(NOW.date() - timedelta(days=1))) == 5


def test_retention_drops_old_partitions_and_keeps_the_newest_rows(pg: Engine) -> None:
    ages = [20, 10, 6, 4, 1, 0]  # days
    # The day partitions the upkeep made on those days (it makes today's and a few ahead).
    with pg.begin() as conn:
        ensure_partitions(conn, [(NOW - timedelta(days=age)).date() for age in ages])
    # A day with no partition: its rows wait in the default partition.
    store_envelopes(pg, [message("age15", 1, NOW - timedelta(days=15))])
    assert rows_in(pg, DEFAULT_PARTITION) == 1
    for age in ages:
        received = NOW - timedelta(days=age)
        store_envelopes(
            pg, [message(f"age{age}", n, received + timedelta(seconds=n)) for n in range(3)]
        )
    report = run_upkeep(pg, Retention(telemetry_days=5), NOW)
    names = partitions(pg)
    for age in (20, 10, 6):
        assert partition_name((NOW - timedelta(days=age)).date()) not in names
    for age in (4, 1, 0):
        assert partition_name((NOW - timedelta(days=age)).date()) in names
    assert len(report.partitions_dropped) == 3
    assert rows_in(pg, DEFAULT_PARTITION) == 0
    assert count_rows(pg, device_prefix="age15") == 0
    assert count_rows(pg, device_prefix="age20") == 0
    assert count_rows(pg, device_prefix="age10") == 0
    assert count_rows(pg, device_prefix="age6") == 0
    for age in (4, 1, 0):
        assert count_rows(pg, device_prefix=f"age{age}") == 3
    newest = [message("age0", n, NOW + timedelta(seconds=n)) for n in range(3)]
    assert store_envelopes(pg, newest) == 0  # the newest rows are there, untouched


def test_a_day_whose_rows_went_to_the_default_partition_is_created_from_them(pg: Engine) -> None:
    far = NOW + timedelta(days=30)  # beyond the days made ahead
    assert (
        store_envelopes(pg, [message("far", n, far + timedelta(seconds=n)) for n in range(4)]) == 4
    )
    assert rows_in(pg, DEFAULT_PARTITION) == 4
    run_upkeep(pg, Retention(), far)
    assert rows_in(pg, DEFAULT_PARTITION) == 0
    assert rows_in(pg, partition_name(far.date())) == 4
    assert store_envelopes(pg, [message("far", 0, far)]) == 0


def test_an_unpartitioned_table_with_rows_is_migrated(pg_url: str) -> None:
    migrate(pg_url, "0006_handler_runs")
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            for age in (40, 2, 0):
                for n in range(5):
                    conn.execute(
                        text(
                            "INSERT INTO telemetry (envelope_id, device_id, seq, received_at, "
                            "stored_at, transport, protocol, payload) VALUES "
                            "(:id, :d, :n, :at, :at, 'tcp', 'native', CAST('{}' AS json))"
                        ),
                        {
                            "id": envelope_id(f"old{age}", n, 1),
                            "d": f"old{age}",
                            "n": n,
                            "at": NOW - timedelta(days=age, seconds=n),
                        },
                    )
        migrate(pg_url)
        assert count_rows(engine) == 15
        names = partitions(engine)
        for age in (40, 2, 0):
            assert partition_name((NOW - timedelta(days=age, seconds=4)).date()) in names
        assert rows_in(engine, DEFAULT_PARTITION) == 0
        # The migrated rows still deduplicate: a redelivery and a retransmission.
        again = [message("old2", n, NOW - timedelta(days=2, seconds=n)) for n in range(5)]
        assert store_envelopes(engine, again) == 0
        assert store_envelopes(engine, [message("old0", 1, NOW + timedelta(minutes=5))]) == 0
    finally:
        engine.dispose()


def test_one_claimant_wins_the_lease_per_interval(pg: Engine) -> None:
    interval = timedelta(minutes=10)
    winners: list[str] = []
    barrier = threading.Barrier(4)

    def claim(name: str) -> None:
        barrier.wait()
        if claim_lease(pg, "job", interval, name, NOW):
            winners.append(name)

    threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1
    assert not claim_lease(pg, "job", interval, "late", NOW + timedelta(minutes=9))
    assert claim_lease(pg, "job", interval, "next", NOW + timedelta(minutes=10))


def test_sqlite_retention_deletes_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    monkeypatch.setattr(hub.upkeep, "DELETE_BATCH_ROWS", 7)
    statements: list[str] = []

    from sqlalchemy import event

    @event.listens_for(engine, "before_cursor_execute")
    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("DELETE FROM telemetry"):
            statements.append(statement)

    old = [message("old", n, NOW - timedelta(days=9, seconds=n)) for n in range(30)]
    new = [message("new", n, NOW - timedelta(days=1, seconds=n)) for n in range(5)]
    store_envelopes(engine, old + new)
    report = enforce_retention(engine, Retention(telemetry_days=3), NOW)
    assert report.rows_deleted["telemetry"] == 30
    assert len(statements) == 5  # 7 + 7 + 7 + 7 + 2
    assert count_rows(engine, device_prefix="old") == 0
    assert count_rows(engine, device_prefix="new") == 5
    assert store_envelopes(engine, new) == 0
    engine.dispose()


def test_real_workers_run_the_upkeep_once_for_the_fleet(pg_url: str, tmp_path: Path) -> None:
    # Two workers (each on its own local queue: no task is needed for the
    # upkeep) start together on one database with a retention of 5 days.
    migrate(pg_url)
    engine = make_engine(pg_url)
    old_day = (NOW - timedelta(days=10)).date()
    with engine.begin() as conn:
        ensure_partitions(conn, [old_day])
    store_envelopes(engine, [message("old", 1, NOW - timedelta(days=10))])
    workers = []
    try:
        for n in range(2):
            (tmp_path / f"worker{n}").mkdir()
            settings = make_test_settings(
                tmp_path / f"worker{n}",
                database_url=pg_url,
                telemetry_retention_days=5,
                maintenance_interval_s=3600,
            )
            workers.append(Worker(settings, tmp_path / f"worker{n}.log"))
        assert wait_until(lambda: partition_name(old_day) not in partitions(engine), timeout=60)
        with engine.connect() as conn:
            holders = conn.execute(text("SELECT holder FROM maintenance_leases")).scalars().all()
        assert len(holders) == 1 and holders[0].startswith("test-")
        assert count_rows(engine, device_prefix="old") == 0
    finally:
        for worker in workers:
            worker.stop()
        engine.dispose()


def test_old_handler_runs_and_finished_commands_are_deleted(pg: Engine) -> None:
    table_runs, table_commands = HandlerRunRow.__table__, CommandRow.__table__
    with pg.begin() as conn:
        conn.execute(
            insert(table_runs),
            [
                {
                    "envelope_id": f"e{n}",
                    "handler": "h",
                    "ran_at": NOW - timedelta(days=10 * (n < 7)),
                }
                for n in range(10)
            ],
        )
        conn.execute(
            insert(table_commands),
            [
                {
                    "id": f"c{n}", "device_id": "d", "name": "x", "args": {},
                    "status": "succeeded" if n % 2 else "pending",
                    "created_at": NOW - timedelta(days=10), "expires_at": NOW,
                    "finished_at": NOW - timedelta(days=10) if n % 2 else None,
                }
                for n in range(6)
            ],
        )  # fmt: skip
    report = enforce_retention(pg, Retention(handler_runs_days=5, commands_days=5), NOW)
    assert report.rows_deleted == {"handler_runs": 7, "commands": 3}
    assert rows_in(pg, "handler_runs") == 3
    with pg.connect() as conn:
        left = conn.execute(text("SELECT status FROM commands")).scalars().all()
    assert sorted(left) == ["pending"] * 3  # open commands stay, however old
