"""The time-ordered telemetry key: once per envelope id, on both engines.

The key is (received_at, envelope_id) (hub/storage.py): a redelivered batch
carries the same key; a device's retransmission carries the same id with a
later `received_at` and is found through (device_id, seq).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, bindparam, select, text

from hub.envelope import Envelope, Kind, envelope_id
from hub.settings import normalise_database_url
from hub.storage import TelemetryRow, UtcDateTime, count_rows, make_engine, migrate, store_envelopes
from tests.support.postgres import postgres_database

NOW = datetime.now(UTC).replace(microsecond=0)


def message(device: str, seq: int, received: datetime, boot: int = 1) -> Envelope:
    return Envelope(
        id=envelope_id(device, seq, boot_id=boot),
        device_id=device,
        kind=Kind.TELEMETRY,
        payload={"t": seq},
        transport="tcp",
        protocol="native",
        seq=seq,
        received_at=received,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
        else:
            url = normalise_database_url(stack.enter_context(postgres_database()))
        migrate(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()


def stored_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(text("SELECT envelope_id FROM telemetry"))]


def test_a_redelivered_batch_is_stored_once(engine: Engine) -> None:
    batch = [message(f"d{n % 3}", n, NOW + timedelta(milliseconds=n)) for n in range(30)]
    assert store_envelopes(engine, batch) == 30
    assert store_envelopes(engine, batch) == 0
    assert store_envelopes(engine, list(reversed(batch[:10]))) == 0
    assert count_rows(engine) == 30


def test_a_retransmission_received_later_is_stored_once(engine: Engine) -> None:
    original = [message("d", n, NOW + timedelta(seconds=n)) for n in range(5)]
    assert store_envelopes(engine, original) == 5
    # The device reconnects (to another hub, an hour later) and resends 3 and 4,
    # then goes on with 5: new envelopes, same ids, later received_at.
    later = NOW + timedelta(hours=1)
    resent = [message("d", n, later + timedelta(seconds=n)) for n in (3, 4, 5)]
    assert store_envelopes(engine, resent) == 1
    ids = stored_ids(engine)
    assert sorted(ids) == sorted({e.id for e in original} | {resent[-1].id})
    # The copy kept is the first one stored.
    with engine.connect() as conn:
        kept = conn.execute(
            select(TelemetryRow.received_at).where(TelemetryRow.envelope_id == resent[0].id)
        ).scalar_one()
    assert kept == original[3].received_at
    assert count_rows(engine) == 6


def test_a_retransmission_in_the_same_batch_keeps_the_first_copy(engine: Engine) -> None:
    first = message("d", 7, NOW)
    again = message("d", 7, NOW + timedelta(seconds=2))
    assert store_envelopes(engine, [again, first]) == 1
    assert stored_ids(engine) == [first.id]
    assert count_rows(engine) == 1


def test_another_boot_with_the_same_seq_is_a_new_message(engine: Engine) -> None:
    assert store_envelopes(engine, [message("d", 1, NOW, boot=1)]) == 1
    assert store_envelopes(engine, [message("d", 1, NOW + timedelta(seconds=1), boot=2)]) == 1
    assert count_rows(engine) == 2


def test_a_retransmission_beyond_the_window_is_stored_again(engine: Engine) -> None:
    # What the window means (retransmission_window_h): older copies are not looked up.
    assert store_envelopes(engine, [message("d", 1, NOW)]) == 1
    late = [message("d", 1, NOW + timedelta(hours=3))]
    assert store_envelopes(engine, late, retransmission_window=timedelta(hours=1)) == 1
    assert count_rows(engine) == 2


def test_copies_stored_by_concurrent_workers_are_kept_once(engine: Engine) -> None:
    # Two workers store copies of the same 200 messages (a hub's batch and the
    # devices' retransmissions through another hub) at the same moment.
    devices = [f"c{n}" for n in range(20)]
    first = [message(d, n, NOW + timedelta(microseconds=n)) for d in devices for n in range(10)]
    second = [
        message(d, n, NOW + timedelta(seconds=5, microseconds=n))
        for d in devices
        for n in range(10)
    ]
    barrier = threading.Barrier(2)
    results: list[int] = []
    errors: list[BaseException] = []

    def store(batch: list[Envelope]) -> None:
        barrier.wait()
        for _ in range(20):  # SQLite may answer "locked" to one of them: a retry, as a task
            try:
                results.append(store_envelopes(engine, batch))
                return
            except Exception as exc:
                if "locked" not in str(exc):
                    errors.append(exc)
                    return
        errors.append(RuntimeError("never stored"))

    threads = [threading.Thread(target=store, args=(b,)) for b in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sum(results) == 200
    assert count_rows(engine) == 200
    assert len(set(stored_ids(engine))) == 200


def test_sqlite_rebuilds_an_existing_table_with_the_time_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url, "0006_handler_runs")
    engine = make_engine(url)
    old = [message("old", n, NOW - timedelta(days=3, seconds=n)) for n in range(6)]
    with engine.begin() as conn:
        for e in old:
            conn.execute(
                text(
                    "INSERT INTO telemetry (envelope_id, device_id, seq, received_at, stored_at, "
                    "transport, protocol, payload) VALUES (:id, :d, :n, :at, :at, 'tcp', "
                    "'native', '{}')"
                ).bindparams(bindparam("at", type_=UtcDateTime)),
                {"id": e.id, "d": e.device_id, "n": e.seq, "at": e.received_at},
            )
    migrate(url)
    with engine.connect() as conn:
        key = [
            row[1]
            for row in sorted(
                conn.execute(text("PRAGMA table_info(telemetry)")), key=lambda r: r[5]
            )
            if row[5]
        ]
    assert key == ["received_at", "envelope_id"]
    assert count_rows(engine) == 6
    resent = message("old", 2, NOW - timedelta(days=3, hours=-1))
    assert store_envelopes(engine, [resent]) == 0  # still found as a retransmission
    engine.dispose()
