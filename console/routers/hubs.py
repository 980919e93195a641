"""`/api/hubs`: the hub processes, from their heartbeats.

Layer: console.
"""

from __future__ import annotations

from fastapi import APIRouter

from console import schemas
from console.deps import Db, Viewer
from hub import hubs

router = APIRouter(prefix="/api/hubs", tags=["hubs"])


def hub_model(info: hubs.HubInfo) -> schemas.Hub:
    b = info.beat
    return schemas.Hub(
        id=b.hub_id,
        version=b.version,
        mode=b.mode,
        hostname=b.hostname,
        pid=b.pid,
        listeners=[schemas.Listener(**x) for x in b.listeners],
        devices_connected={"tcp": b.devices_tcp, "mqtt": b.devices_mqtt},
        spool_messages=b.spool_messages,
        broker_connected=b.broker_connected,
        started_at=b.started_at,
        last_heartbeat=info.last_heartbeat,
        alive=info.alive,
    )


@router.get("")
def list_hubs(_: Viewer, engine: Db) -> list[schemas.Hub]:
    """Every hub that has a heartbeat row; `alive` is false after three missed beats."""
    return [hub_model(h) for h in hubs.hubs(engine)]
