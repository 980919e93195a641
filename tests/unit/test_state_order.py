"""Each device's state follows the order of its messages, not of stored batches.

Workers store batches in any order (presence, telemetry and state travel on
separate queues; a spool replays late), so these tests store the same
messages in the orders that happen and check the one answer that is right
(hub/presence.py, docs/delivery.md "Order of state and presence").
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub.envelope import Envelope, Kind, envelope_id
from hub.presence import message_stamp
from hub.settings import normalise_database_url
from hub.storage import count_rows, device_state, make_engine, migrate, recent_telemetry
from hub.storage import store_envelopes as store
from hub.uplink import presence_envelope
from tests.support.postgres import postgres_database

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def telemetry(
    device: str, seq: int, values: dict[str, object], received: float, *, timed: bool = True
) -> Envelope:
    """A device message; `timed` gives it a device time (one second before receipt)."""
    return Envelope(
        id=envelope_id(device, seq, boot_id=1),
        device_id=device,
        kind=Kind.TELEMETRY,
        payload=values,
        transport="tcp",
        protocol="native",
        seq=seq,
        device_time=at(received - 1) if timed else None,
        received_at=at(received),
    )


def connect(device: str, since: float, transport: str = "tcp") -> Envelope:
    return presence_envelope(
        device, online=True, since=at(since), transport=transport, protocol=transport
    )


def disconnect(device: str, since: float, when: float) -> Envelope:
    return presence_envelope(
        device, online=False, since=at(since), at=at(when), transport="tcp", protocol="native"
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


def online(engine: Engine, device: str) -> bool:
    row = device_state(engine, device)
    assert row is not None
    return bool(row["online"])


def test_a_message_stored_after_the_disconnect_does_not_bring_the_device_back(
    engine: Engine,
) -> None:
    # The reported defect: telemetry read at 5 s, its batch stored after the
    # disconnect of 10 s was (another queue, another worker).
    store(engine, [connect("d", 0)])
    store(engine, [disconnect("d", 0, 10)])
    store(engine, [telemetry("d", 1, {"t": 1}, 5)])
    assert not online(engine, "d")


def test_a_later_disconnect_wins_in_every_order_of_storing(engine: Engine) -> None:
    batches = [[connect("d", 0)], [telemetry("d", 1, {"t": 1}, 5)], [disconnect("d", 0, 10)]]
    for n, order in enumerate(itertools.permutations(batches)):
        device = f"d{n}"
        for batch in order:
            store(engine, [e.__class__(**{**_fields(e), "device_id": device}) for e in batch])
        assert not online(engine, device), order


def test_a_newer_connection_to_another_hub_wins_over_a_late_disconnect(engine: Engine) -> None:
    # Connected to hub A at 0; moves to hub B at 20; A notices the loss only at
    # 30 (its idle check). A's disconnect is later in time, but ends an older
    # connection: the device is online (at B), in every order of storing.
    batches = [
        [connect("d", 0)],
        [connect("d", 20, "mqtt")],
        [disconnect("d", 0, 30)],
    ]
    for n, order in enumerate(itertools.permutations(batches)):
        device = f"m{n}"
        for batch in order:
            store(engine, [e.__class__(**{**_fields(e), "device_id": device}) for e in batch])
        row = device_state(engine, device)
        assert row is not None and row["online"], order
        assert row["transport"] == "mqtt", order  # where it is connected now
    # ... and when B's connection ends too, it is offline.
    store(engine, [disconnect("m0", 20, 40)])
    assert not online(engine, "m0")


def test_a_message_received_after_a_disconnect_means_the_device_is_back(engine: Engine) -> None:
    # Its connect's presence was lost (presence is best effort): the message
    # itself is proof of a connection newer than the disconnect.
    store(engine, [connect("d", 0), disconnect("d", 0, 10)])
    store(engine, [telemetry("d", 1, {"t": 1}, 15)])
    assert online(engine, "d")


def test_a_retransmission_changes_nothing(engine: Engine) -> None:
    # The reported defect: a resent message (same boot and seq, so the same
    # id) was stored once, but overwrote the last values and the last seen.
    store(engine, [telemetry("d", 1, {"t": 1}, 1, timed=False)])
    store(engine, [telemetry("d", 2, {"t": 2}, 2, timed=False)])
    before = device_state(engine, "d")
    resent = telemetry("d", 1, {"t": 1}, 9, timed=False)  # received later, same message
    assert store(engine, [resent]) == 0
    after = device_state(engine, "d")
    assert before is not None and after is not None
    assert after["last_values"] == {"t": 2}
    assert after["last_seen_at"] == before["last_seen_at"] == at(2)
    assert [r["payload"] for r in recent_telemetry(engine, "d")] == [{"t": 1}, {"t": 2}]


def test_a_retransmission_in_the_same_batch_is_applied_once(engine: Engine) -> None:
    first = telemetry("d", 1, {"t": 1}, 1, timed=False)
    store(engine, [telemetry("d", 2, {"t": 2}, 2, timed=False)])
    assert store(engine, [first, telemetry("d", 1, {"t": 1}, 9, timed=False)]) == 1
    row = device_state(engine, "d")
    assert row is not None and row["last_values"] == {"t": 2}


def test_an_older_message_stored_late_never_rolls_the_values_back(engine: Engine) -> None:
    # Two messages of the device, stored in the opposite order (a spool replay):
    # each key ends with its value from the newest message that carries it.
    newer = telemetry("d", 8, {"t": 8, "rh": 80}, 8)
    older = telemetry("d", 7, {"t": 7, "battery": 3.1}, 7)
    store(engine, [newer])
    store(engine, [older])
    row = device_state(engine, "d")
    assert row is not None
    assert row["last_values"] == {"t": 8, "rh": 80, "battery": 3.1}
    assert row["last_seen_at"] == at(8)


def test_sequence_orders_messages_of_the_same_device_time(engine: Engine) -> None:
    a = telemetry("d", 2, {"t": 2}, 5)
    b = telemetry("d", 1, {"t": 1}, 5)
    store(engine, [a])
    store(engine, [b])
    row = device_state(engine, "d")
    assert row is not None and row["last_values"] == {"t": 2}


def test_state_reports_are_ordered_too(engine: Engine) -> None:
    def report(seq: int, fw: str, received: float) -> Envelope:
        return Envelope(
            device_id="d",
            kind=Kind.STATE,
            payload={"fw": fw},
            transport="mqtt",
            protocol="mqtt",
            seq=seq,
            device_time=at(received),
            received_at=at(received),
        )

    store(engine, [report(2, "2.0", 2)])
    store(engine, [report(1, "1.0", 1)])
    row = device_state(engine, "d")
    assert row is not None and row["state"] == {"fw": "2.0"}


def test_a_database_of_the_previous_schema_moves_forward(tmp_path: Path) -> None:
    # A device_state row written before the stamps existed: its values count
    # as older than any new message, its presence as older than any event.
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from hub.storage import MIGRATIONS_DIR

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "0003_dead_letters")
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO device_state VALUES ('d', '{}', '{\"t\": 0, \"old\": 1}', 1, "
                "'tcp', '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
            )
        )
    migrate(url)
    store(eng, [telemetry("d", 1, {"t": 1}, 1), disconnect("d", 0, 2)])
    row = device_state(eng, "d")
    eng.dispose()
    assert row is not None
    assert row["last_values"] == {"t": 1, "old": 1}
    assert row["online"] is False
    assert count_rows(make_engine(url)) == 1


def _fields(env: Envelope) -> dict[str, object]:
    return {name: getattr(env, name) for name in Envelope.__dataclass_fields__}


def test_a_retransmitted_state_report_changes_nothing(engine: Engine) -> None:
    # No device time: the resend is received later, so only its id tells it apart.
    def report(seq: int, fw: str, received: float) -> Envelope:
        return Envelope(
            id=envelope_id("d", seq, boot_id=1),
            device_id="d",
            kind=Kind.STATE,
            payload={"fw": fw},
            transport="tcp",
            protocol="native",
            seq=seq,
            received_at=at(received),
        )

    store(engine, [report(1, "1.0", 1)])
    store(engine, [report(2, "2.0", 2)])
    store(engine, [report(1, "1.0", 9)])
    row = device_state(engine, "d")
    assert row is not None and row["state"] == {"fw": "2.0"} and row["last_seen_at"] == at(2)


def test_the_migration_goes_down_and_up_again(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from hub.storage import MIGRATIONS_DIR

    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    migrate(url)
    command.downgrade(config, "0003_dead_letters")
    eng = make_engine(url)
    assert "state_reports" not in inspect(eng).get_table_names()
    assert "presence_at" not in {c["name"] for c in inspect(eng).get_columns("device_state")}
    eng.dispose()
    migrate(url)
    eng = make_engine(url)
    store(eng, [telemetry("d", 1, {"t": 1}, 1)])
    assert device_state(eng, "d") is not None
    eng.dispose()


@pytest.mark.parametrize(
    "moment",
    [
        T0,
        datetime(2026, 5, 6, 7, 8, 9, 10, tzinfo=timezone(timedelta(hours=3))),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1000, 1, 1, tzinfo=UTC),
        datetime(5, 1, 1, 12, tzinfo=UTC),
    ],
    ids=str,
)
def test_stamps_keep_the_text_of_stamps_stored_before(moment: datetime) -> None:
    """Stamps are stored (last_values_at, state_at) and compared as text with
    new ones: their text must never change, whatever makes it."""
    message = telemetry("d", 42, {}, 0)
    stamp = message_stamp(replace(message, device_time=moment))
    assert stamp == f"{moment.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}|{42:020d}"
