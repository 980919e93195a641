"""Commands to devices: their record in the database and their wire form.

Layer: core; imports `hub.storage` and `hub.errors`. No Celery, no asyncio:
the Celery side is `tasks.commands`, the delivery side `bridges.downlink`.

A command lives in the `commands` table from `send_command` until the device
answers or its time to live passes. The hub process holding the device's
connection is found in `device_connections`; the command travels to that
hub's own queue, and a hub also delivers the pending commands of a device
when it connects, so a command sent while the device was offline, connecting,
or held by a hub that died is never missed. One connection of a device is
handed a command once, and only while it is open here (bridges/downlink.py);
a command whose connection ended before the device answered is handed again
on its next connect, since no hub can know whether it arrived (the first
answer wins). A device no hub holds may be on an
external MQTT broker: its command goes to a hub bridging that broker, which
publishes it only after `claim_delivery`, so exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, delete, insert, select, update

from hub.storage import CommandRow, DeviceConnection, _insert_ignore

PENDING = "pending"
#: Handed to the device's connection; still open (the device may not have answered).
DELIVERED = "delivered"
#: Not finished yet: a delivered command is delivered again on the next connect.
OPEN = (PENDING, DELIVERED)
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"


#: The listener name a hub that bridges an external MQTT broker shows in its
#: heartbeat; `tasks.commands.send_command` hands such a hub the commands of
#: devices no hub holds (docs/mqtt.md, "External-broker mode").
EXTERNAL_MQTT_LISTENER = "mqtt-external"


def downlink_queue(hub_id: str) -> str:
    """The queue of one hub process (addressed through the default exchange)."""
    return f"hub.downlink.{hub_id}"


@dataclass(frozen=True, slots=True)
class PendingCommand:
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    expires_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device_id": self.device_id,
            "name": self.name,
            "args": self.args,
            "expires_at": self.expires_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PendingCommand:
        return cls(
            id=str(data["id"]),
            device_id=str(data["device_id"]),
            name=str(data["name"]),
            args=dict(data.get("args") or {}),
            expires_at=datetime.fromisoformat(data["expires_at"]),
        )

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


def create_command(
    engine: Engine, command_id: str, device_id: str, name: str, args: dict[str, Any], ttl_s: float
) -> tuple[PendingCommand, str | None]:
    """Record a pending command; returns it and the hub holding the device (or None)."""
    now = datetime.now(UTC)
    command = PendingCommand(command_id, device_id, name, args, now + timedelta(seconds=ttl_s))
    with engine.begin() as conn:
        conn.execute(
            insert(CommandRow).values(
                id=command_id,
                device_id=device_id,
                name=name,
                args=args,
                status=PENDING,
                created_at=now,
                expires_at=command.expires_at,
            )
        )
        hub_id = conn.execute(
            select(DeviceConnection.hub_id).where(DeviceConnection.device_id == device_id)
        ).scalar_one_or_none()
    return command, hub_id


def finish_command(engine: Engine, command_id: str, status: str) -> bool:
    """Move an open command to `status`; False if it was finished already."""
    with engine.begin() as conn:
        result = conn.execute(
            update(CommandRow)
            .where(CommandRow.id == command_id, CommandRow.status.in_(OPEN))
            .values(status=status, finished_at=datetime.now(UTC))
        )
    return result.rowcount == 1


def mark_delivered(engine: Engine, command_id: str) -> None:
    """Note that a hub handed the command to its device (pending -> delivered)."""
    with engine.begin() as conn:
        conn.execute(
            update(CommandRow)
            .where(CommandRow.id == command_id, CommandRow.status == PENDING)
            .values(status=DELIVERED)
        )


def claim_delivery(engine: Engine, command_id: str) -> bool:
    """Move a pending, unexpired command to delivered; True for the one caller
    that did it. The external-broker bridge publishes only after winning this
    claim, so a command is published once however many hubs are handed it."""
    with engine.begin() as conn:
        result = conn.execute(
            update(CommandRow)
            .where(
                CommandRow.id == command_id,
                CommandRow.status == PENDING,
                CommandRow.expires_at > datetime.now(UTC),
            )
            .values(status=DELIVERED)
        )
    return result.rowcount == 1


def pending_commands(engine: Engine, device_id: str) -> list[PendingCommand]:
    """A device's open (pending or delivered), unexpired commands, oldest first."""
    now = datetime.now(UTC)
    query = (
        select(CommandRow)
        .where(
            CommandRow.device_id == device_id,
            CommandRow.status.in_(OPEN),
            CommandRow.expires_at > now,
        )
        .order_by(CommandRow.created_at)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [PendingCommand(r.id, r.device_id, r.name, dict(r.args), r.expires_at) for r in rows]


def command_status(engine: Engine, command_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            select(CommandRow.status).where(CommandRow.id == command_id)
        ).scalar_one_or_none()


def connected(
    engine: Engine,
    device_id: str,
    hub_id: str,
    transport: str,
    connected_at: datetime | None = None,
) -> None:
    """Record that `hub_id` holds the device's connection since `connected_at`
    (default now). The newest connect wins by time, not by which record is
    written last: a slow write of an older connect to another hub changes nothing."""
    now = connected_at or datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            delete(DeviceConnection).where(
                DeviceConnection.device_id == device_id, DeviceConnection.connected_at <= now
            )
        )
        # A newer connection's row is still there: the insert is then ignored.
        conn.execute(
            _insert_ignore(engine, DeviceConnection.__table__),
            [
                {
                    "device_id": device_id,
                    "hub_id": hub_id,
                    "transport": transport,
                    "connected_at": now,
                }
            ],
        )


def disconnected(engine: Engine, device_id: str, hub_id: str) -> None:
    """Forget the connection, unless another hub has taken the device over since."""
    with engine.begin() as conn:
        conn.execute(
            delete(DeviceConnection).where(
                DeviceConnection.device_id == device_id, DeviceConnection.hub_id == hub_id
            )
        )


@dataclass(frozen=True, slots=True)
class ConnectionChange:
    """A device connected to this hub (`transport` set) or disconnected (None), at `at`."""

    device_id: str
    transport: str | None
    at: datetime


#: Devices per `IN (...)` list: well under every backend's limit on bound parameters.
_IN_CHUNK = 500


def record_connections(engine: Engine, hub_id: str, changes: Sequence[ConnectionChange]) -> None:
    """Write many `connected` and `disconnected` records of one hub in one
    transaction, with the same effect as writing them one by one in the order
    given. One commit for a batch rather than one per connect is what lets a
    hub take thousands of connects per second (a connection storm after a
    restart). Each device's changes keep their order: the batch is cut into
    rounds (every device's first change, then every second one, ...), and
    devices are independent within a round."""
    rounds: list[list[ConnectionChange]] = []
    seen: dict[str, int] = {}
    for change in changes:
        nth = seen.get(change.device_id, 0)
        seen[change.device_id] = nth + 1
        if nth == len(rounds):
            rounds.append([])
        rounds[nth].append(change)
    table = DeviceConnection.__table__
    older = delete(DeviceConnection).where(
        DeviceConnection.device_id == bindparam("b_device"),
        DeviceConnection.connected_at <= bindparam("b_at"),
    )
    ours = delete(DeviceConnection).where(
        DeviceConnection.device_id == bindparam("b_device"), DeviceConnection.hub_id == hub_id
    )
    with engine.begin() as conn:
        for batch in rounds:
            connects = [c for c in batch if c.transport is not None]
            gone = [{"b_device": c.device_id} for c in batch if c.transport is None]
            if connects:
                conn.execute(older, [{"b_device": c.device_id, "b_at": c.at} for c in connects])
                # A newer connection's row is still there: the insert is then ignored.
                conn.execute(
                    _insert_ignore(engine, table),
                    [
                        {
                            "device_id": c.device_id,
                            "hub_id": hub_id,
                            "transport": c.transport,
                            "connected_at": c.at,
                        }
                        for c in connects
                    ],
                )
            if gone:
                conn.execute(ours, gone)


def pending_commands_of(
    engine: Engine, device_ids: Sequence[str]
) -> dict[str, list[PendingCommand]]:
    """`pending_commands` of many devices in a few queries: device id -> its
    open, unexpired commands, oldest first (devices without any are left out)."""
    now = datetime.now(UTC)
    found: dict[str, list[PendingCommand]] = {}
    unique = list(dict.fromkeys(device_ids))
    with engine.connect() as conn:
        for start in range(0, len(unique), _IN_CHUNK):
            query = (
                select(CommandRow)
                .where(
                    CommandRow.device_id.in_(unique[start : start + _IN_CHUNK]),
                    CommandRow.status.in_(OPEN),
                    CommandRow.expires_at > now,
                )
                .order_by(CommandRow.created_at)
            )
            for r in conn.execute(query):
                found.setdefault(r.device_id, []).append(
                    PendingCommand(r.id, r.device_id, r.name, dict(r.args), r.expires_at)
                )
    return found


def forget_hub(engine: Engine, hub_id: str) -> None:
    """Drop every connection record of a hub that stops."""
    with engine.begin() as conn:
        conn.execute(delete(DeviceConnection).where(DeviceConnection.hub_id == hub_id))
