"""What the console shows of the fleet: devices with presence, one device, its telemetry.

Layer: core; imports `hub.storage` and `hub.hubs`. Read-only queries; the
changes go through `hub.registry`, `hub.commands` and `tasks`.

Presence comes from the hubs, not from the last message: a device is online
while a hub that is alive (hub/hubs.py) holds its connection. So with no hub
running, every device shows offline, whatever its last state said.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, literal, select

from hub.hubs import live_hub_ids
from hub.storage import CommandRow, Device, DeviceConnection, DeviceState, TelemetryRow

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    id: str
    online: bool
    last_seen: datetime | None
    transport: str | None
    hub: str | None


@dataclass(frozen=True, slots=True)
class DeviceDetail:
    summary: DeviceSummary
    created_at: datetime
    state: dict[str, Any]
    last_values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DevicePage:
    items: list[DeviceSummary]
    total: int
    offset: int
    limit: int


@dataclass(frozen=True, slots=True)
class TelemetryPoint:
    received_at: datetime
    device_time: datetime | None
    seq: int | None
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CommandInfo:
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    status: str
    created_at: datetime
    finished_at: datetime | None


def _device_query(live: list[str]) -> Any:
    connection = and_(DeviceConnection.device_id == Device.id, DeviceConnection.hub_id.in_(live))
    online = DeviceConnection.hub_id.is_not(None) if live else literal(False)
    return (
        select(
            Device.id,
            Device.created_at,
            online.label("online"),
            DeviceState.last_seen_at,
            func.coalesce(DeviceConnection.transport, DeviceState.transport).label("transport"),
            DeviceConnection.hub_id,
            DeviceState.state,
            DeviceState.last_values,
        )
        .select_from(Device)
        .outerjoin(DeviceState, DeviceState.device_id == Device.id)
        .outerjoin(DeviceConnection, connection if live else literal(False))
    )


def _summary(row: Any) -> DeviceSummary:
    return DeviceSummary(
        row.id,
        bool(row.online),
        row.last_seen_at,
        row.transport,
        row.hub_id if row.online else None,
    )


def list_devices(
    engine: Engine,
    *,
    online: bool | None = None,
    prefix: str = "",
    offset: int = 0,
    limit: int = 100,
) -> DevicePage:
    """One page of devices ordered by id, filtered by presence and id prefix."""
    limit = max(1, min(limit, MAX_PAGE))
    live = live_hub_ids(engine)
    query = _device_query(live)
    if prefix:
        query = query.where(Device.id.startswith(prefix, autoescape=True))
    if online is True:
        query = (
            query.where(DeviceConnection.hub_id.is_not(None))
            if live
            else query.where(literal(False))
        )
    elif online is False and live:
        query = query.where(DeviceConnection.hub_id.is_(None))
    count = select(func.count()).select_from(query.subquery())
    with engine.connect() as conn:
        total = int(conn.execute(count).scalar_one())
        rows = conn.execute(query.order_by(Device.id).offset(offset).limit(limit)).all()
    return DevicePage([_summary(r) for r in rows], total, offset, limit)


def get_device(engine: Engine, device_id: str) -> DeviceDetail | None:
    query = _device_query(live_hub_ids(engine)).where(Device.id == device_id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    return DeviceDetail(
        _summary(row), row.created_at, dict(row.state or {}), dict(row.last_values or {})
    )


def telemetry(
    engine: Engine,
    device_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 1000,
) -> list[TelemetryPoint]:
    """A device's telemetry rows, newest first (uses the (device, received_at) index)."""
    table = TelemetryRow.__table__
    query = select(table.c.received_at, table.c.device_time, table.c.seq, table.c.payload).where(
        table.c.device_id == device_id
    )
    if since is not None:
        query = query.where(table.c.received_at > since)
    if until is not None:
        query = query.where(table.c.received_at <= until)
    query = query.order_by(table.c.received_at.desc()).limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [TelemetryPoint(r.received_at, r.device_time, r.seq, dict(r.payload)) for r in rows]


def _command(row: Any) -> CommandInfo:
    return CommandInfo(
        row.id, row.device_id, row.name, dict(row.args), row.status, row.created_at, row.finished_at
    )


def get_command(engine: Engine, command_id: str) -> CommandInfo | None:
    with engine.connect() as conn:
        row = conn.execute(select(CommandRow).where(CommandRow.id == command_id)).first()
    return _command(row) if row is not None else None


def recent_commands(engine: Engine, device_id: str, limit: int = 20) -> list[CommandInfo]:
    query = (
        select(CommandRow)
        .where(CommandRow.device_id == device_id)
        .order_by(CommandRow.created_at.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return [_command(r) for r in conn.execute(query)]


def commands_finished_since(engine: Engine, since: datetime) -> list[CommandInfo]:
    """Commands that left `pending` after `since` (for the live event stream)."""
    query = (
        select(CommandRow)
        .where(CommandRow.finished_at > since)
        .order_by(CommandRow.finished_at)
        .limit(500)
    )
    with engine.connect() as conn:
        return [_command(r) for r in conn.execute(query)]


def states_updated_since(
    engine: Engine, since: datetime
) -> list[tuple[str, datetime, dict[str, Any]]]:
    """(device, updated_at, last values) of devices whose state changed after `since`."""
    query = (
        select(DeviceState.device_id, DeviceState.updated_at, DeviceState.last_values)
        .where(DeviceState.updated_at > since)
        .order_by(DeviceState.updated_at)
        .limit(2000)
    )
    with engine.connect() as conn:
        return [(r.device_id, r.updated_at, dict(r.last_values or {})) for r in conn.execute(query)]
