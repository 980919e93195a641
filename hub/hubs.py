"""The heartbeat of each running hub process, and which hubs count as alive.

Layer: core; imports `hub.storage`. The hub (hubapp/app.py) writes its row every
`hub_heartbeat_s` and deletes it when it stops; the console reads the table
for its hubs page and for presence: a device is online while a live hub holds
its connection (`device_connections`). A hub that died without cleaning up
stops counting after three missed heartbeats, so its devices show offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Engine, Integer, String, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from hub.storage import Base, DeviceConnection, UtcDateTime

#: Heartbeats a hub may miss before it counts as gone.
MISSED_BEATS = 3


class HubRow(Base):
    __tablename__ = "hubs"

    hub_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(32))
    mode: Mapped[str] = mapped_column(String(200))
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    listeners: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    devices_tcp: Mapped[int] = mapped_column(Integer)
    devices_mqtt: Mapped[int] = mapped_column(Integer)
    spool_messages: Mapped[int] = mapped_column(Integer)
    broker_connected: Mapped[int] = mapped_column(Integer)
    heartbeat_s: Mapped[float] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_heartbeat: Mapped[datetime] = mapped_column(UtcDateTime)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a hub reports about itself."""

    hub_id: str
    version: str
    mode: str
    hostname: str
    pid: int
    listeners: list[dict[str, Any]]
    devices_tcp: int
    devices_mqtt: int
    spool_messages: int
    broker_connected: bool
    heartbeat_s: float
    started_at: datetime


@dataclass(frozen=True, slots=True)
class HubInfo:
    beat: Heartbeat
    last_heartbeat: datetime
    alive: bool


def beat(engine: Engine, hb: Heartbeat) -> None:
    """Write (or refresh) the hub's row, in one statement (safe when many hubs start at once)."""
    now = datetime.now(UTC)
    values = {
        "hub_id": hb.hub_id,
        "version": hb.version,
        "mode": hb.mode,
        "hostname": hb.hostname,
        "pid": hb.pid,
        "listeners": hb.listeners,
        "devices_tcp": hb.devices_tcp,
        "devices_mqtt": hb.devices_mqtt,
        "spool_messages": hb.spool_messages,
        "broker_connected": int(hb.broker_connected),
        "heartbeat_s": hb.heartbeat_s,
        "started_at": hb.started_at,
        "last_heartbeat": now,
    }
    with engine.begin() as conn:
        conn.execute(_upsert(engine, values))


def _upsert(engine: Engine, values: dict[str, Any]) -> Any:
    """One INSERT ... ON CONFLICT DO UPDATE: no window between a check and a
    write, so hubs registering at the same moment never collide."""
    statement: Any
    if engine.dialect.name == "postgresql":
        statement = postgresql.insert(HubRow).values(values)
    elif engine.dialect.name == "sqlite":
        statement = sqlite.insert(HubRow).values(values)
    else:
        raise NotImplementedError(f"database {engine.dialect.name} is not supported")
    changed = {key: statement.excluded[key] for key in values if key != "hub_id"}
    return statement.on_conflict_do_update(index_elements=["hub_id"], set_=changed)


def gone(engine: Engine, hub_id: str) -> None:
    """A hub that stops removes its row."""
    with engine.begin() as conn:
        conn.execute(delete(HubRow).where(HubRow.hub_id == hub_id))


def _alive(row: Any, now: datetime) -> bool:
    return bool(now - row.last_heartbeat <= timedelta(seconds=row.heartbeat_s * MISSED_BEATS))


def hubs(engine: Engine) -> list[HubInfo]:
    """Every hub with a row, newest heartbeat first, and whether it is alive."""
    now = datetime.now(UTC)
    with engine.connect() as conn:
        rows = conn.execute(select(HubRow).order_by(HubRow.last_heartbeat.desc())).all()
    found = []
    for r in rows:
        hb = Heartbeat(
            r.hub_id,
            r.version,
            r.mode,
            r.hostname,
            r.pid,
            list(r.listeners),
            r.devices_tcp,
            r.devices_mqtt,
            r.spool_messages,
            bool(r.broker_connected),
            r.heartbeat_s,
            r.started_at,
        )
        found.append(HubInfo(hb, r.last_heartbeat, _alive(r, now)))
    return found


def holder(engine: Engine, hub_id: str) -> HubInfo | None:
    """The live hub that writes heartbeats under `hub_id`, if any: a hub with a
    set `hub_id` must not start beside another one (docs/scaling.md)."""
    return next((h for h in hubs(engine) if h.beat.hub_id == hub_id and h.alive), None)


def live_hub_ids(engine: Engine) -> list[str]:
    return [h.beat.hub_id for h in hubs(engine) if h.alive]


def live_connections(engine: Engine) -> dict[str, tuple[str, str]]:
    """Device id -> (hub id, transport) for every device a live hub holds."""
    live = set(live_hub_ids(engine))
    if not live:
        return {}
    query = select(
        DeviceConnection.device_id, DeviceConnection.hub_id, DeviceConnection.transport
    ).where(DeviceConnection.hub_id.in_(live))
    with engine.connect() as conn:
        return {r.device_id: (r.hub_id, r.transport) for r in conn.execute(query)}
