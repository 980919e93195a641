"""Which hub holds a device (`device_connections`): ordered by time, not by writes.

Commands are routed by this table. Records are written on threads, so a
slow write could land after a newer one: a device that reconnected looked
disconnected, or an older hub was named as holding it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

import bridges.downlink
from bridges.downlink import Downlink
from hub.commands import (
    ConnectionChange,
    connected,
    create_command,
    disconnected,
    finish_command,
    pending_commands,
    pending_commands_of,
    record_connections,
)
from hub.settings import load_settings
from hub.storage import DeviceConnection, make_engine, migrate

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def holder(engine: Engine, device_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            select(DeviceConnection.hub_id).where(DeviceConnection.device_id == device_id)
        ).scalar_one_or_none()


def test_an_older_connect_written_late_does_not_take_the_device_back(engine: Engine) -> None:
    connected(engine, "d", "hub-b", "tcp", T0 + timedelta(seconds=20))
    connected(engine, "d", "hub-a", "tcp", T0)  # hub A's slow write of its older connect
    assert holder(engine, "d") == "hub-b"
    disconnected(engine, "d", "hub-a")  # and its late disconnect
    assert holder(engine, "d") == "hub-b"
    connected(engine, "d", "hub-a", "tcp", T0 + timedelta(seconds=30))  # the device comes back
    assert holder(engine, "d") == "hub-a"


def test_a_reconnect_is_not_undone_by_a_slow_disconnect_record(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disconnect of the old connection takes longer to write than the
    # connect of the new one (a busy database): records are written on threads.
    def slow_record(engine: Engine, hub_id: str, changes: list[ConnectionChange]) -> None:
        if any(c.transport is None for c in changes):
            time.sleep(0.8)
        record_connections(engine, hub_id, changes)

    monkeypatch.setattr(bridges.downlink, "record_connections", slow_record)
    downlink = Downlink(load_settings(None, data_dir=tmp_path), engine)

    async def scenario() -> None:
        downlink.device_connected("d", "tcp")
        await asyncio.sleep(0.3)
        downlink.device_disconnected("d")
        downlink.device_connected("d", "tcp")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not downlink._tasks:
                break

    asyncio.run(scenario())
    assert holder(engine, "d") == downlink.hub_id


def rows(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        return {
            (r.device_id, r.hub_id)
            for r in conn.execute(select(DeviceConnection.device_id, DeviceConnection.hub_id))
        }


def test_a_batch_of_changes_has_the_effect_of_writing_them_one_by_one(engine: Engine) -> None:
    # Another hub holds "old" since before this hub's connect, and "newer"
    # since after it (a slow batch): only the older row gives way.
    connected(engine, "old", "hub-b", "mqtt", T0)
    connected(engine, "newer", "hub-b", "mqtt", T0 + timedelta(seconds=60))
    at = T0 + timedelta(seconds=10)
    record_connections(
        engine,
        "hub-a",
        [
            ConnectionChange("old", "mqtt", at),
            ConnectionChange("newer", "mqtt", at),
            ConnectionChange("flap", "mqtt", at),
            ConnectionChange("gone", "tcp", at),
            ConnectionChange("flap", None, at + timedelta(seconds=1)),
            ConnectionChange("gone", None, at + timedelta(seconds=1)),
            ConnectionChange("flap", "mqtt", at + timedelta(seconds=2)),
        ],
    )
    assert rows(engine) == {("old", "hub-a"), ("newer", "hub-b"), ("flap", "hub-a")}


def test_a_storm_of_connects_is_written_in_few_transactions(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []

    def counted(engine: Engine, hub_id: str, changes: list[ConnectionChange]) -> None:
        batches.append(len(changes))
        record_connections(engine, hub_id, changes)

    monkeypatch.setattr(bridges.downlink, "record_connections", counted)
    downlink = Downlink(load_settings(None, data_dir=tmp_path), engine)

    async def scenario() -> None:
        for n in range(300):
            downlink.device_connected(f"d{n}", "mqtt")
        for _ in range(200):
            await asyncio.sleep(0.05)
            if not downlink._tasks:
                break

    asyncio.run(scenario())
    assert sum(batches) == 300
    assert len(batches) <= 2  # all arrived before the first write began
    assert len(rows(engine)) == 300


def test_pending_commands_of_many_devices_match_those_of_each(engine: Engine) -> None:
    for n in range(3):
        create_command(engine, f"a-{n}", "a", "blink", {"n": n}, 60)
    create_command(engine, "b-0", "b", "blink", {}, 60)
    create_command(engine, "done", "b", "blink", {}, 60)
    finish_command(engine, "done", "succeeded")
    devices = ["a", "b", "c", *(f"other-{n}" for n in range(600))]  # past one IN list
    found = pending_commands_of(engine, devices)
    assert found == {d: pending_commands(engine, d) for d in ("a", "b")}
    assert [c.id for c in found["a"]] == ["a-0", "a-1", "a-2"]  # oldest first
