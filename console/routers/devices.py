"""`/api/devices`: the registry, presence, telemetry and commands of devices.

Layer: console. Each route parses, calls one function of `hub.fleet` or
`console.actions`, and shapes the answer.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response, status
from fastapi.responses import PlainTextResponse

from console import actions, schemas
from console.deps import Admin, Db, Operator, Viewer
from hub import fleet

router = APIRouter(prefix="/api/devices", tags=["devices"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.Problem},
    403: {"model": schemas.Problem},
}


def summary(item: fleet.DeviceSummary) -> schemas.DeviceSummary:
    return schemas.DeviceSummary(
        id=item.id,
        online=item.online,
        last_seen=item.last_seen,
        transport=item.transport,
        hub=item.hub,
    )


@router.get("", responses=ERRORS)
def list_devices(
    _: Viewer,
    engine: Db,
    online: Annotated[
        bool | None, Query(description="Only online (true) or offline (false).")
    ] = None,
    prefix: Annotated[str, Query(max_length=128, description="Ids starting with this.")] = "",
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=fleet.MAX_PAGE)] = 100,
) -> schemas.DevicePage:
    """One page of devices, ordered by id."""
    page = fleet.list_devices(engine, online=online, prefix=prefix, offset=offset, limit=limit)
    return schemas.DevicePage(
        items=[summary(d) for d in page.items],
        total=page.total,
        offset=page.offset,
        limit=page.limit,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={**ERRORS, 409: {"model": schemas.Problem}, 422: {"model": schemas.Problem}},
)
def add_device(who: Admin, engine: Db, body: schemas.NewDevice) -> schemas.Credential:
    """Register a device. Its credential is in the answer and never shown again."""
    return schemas.Credential(id=body.id, credential=actions.add_device(engine, who, body.id))


@router.post(
    "/import",
    responses={**ERRORS, 422: {"model": schemas.Problem}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/csv": {"schema": {"type": "string"}, "example": "id\nthermo-1\n"}},
        }
    },
)
async def import_devices(who: Admin, engine: Db, request: Request) -> schemas.ImportResult:
    """Register every device of a CSV (the `id` column, or the first one)."""
    text = (await request.body()).decode("utf-8", errors="replace")
    from starlette.concurrency import run_in_threadpool

    result = await run_in_threadpool(actions.import_devices, engine, who, text)
    return schemas.ImportResult(
        created=[schemas.Credential(id=d, credential=c) for d, c in result.created],
        errors=result.errors,
    )


@router.get("/{device_id}", responses={**ERRORS, 404: {"model": schemas.Problem}})
def get_device(_: Viewer, engine: Db, device_id: str) -> schemas.DeviceDetail:
    """Last known state, last values and presence."""
    found = fleet.get_device(engine, device_id)
    if found is None:
        raise actions.NotFound(f"no device {device_id!r}")
    return schemas.DeviceDetail(
        **summary(found.summary).model_dump(),
        created_at=found.created_at,
        state=found.state,
        last_values=found.last_values,
    )


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**ERRORS, 404: {"model": schemas.Problem}},
)
def remove_device(who: Admin, engine: Db, device_id: str) -> Response:
    """Remove a device from the registry and drop its connection (its data stays)."""
    actions.remove_device(engine, who, device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{device_id}/credential", responses={**ERRORS, 404: {"model": schemas.Problem}})
def rekey_device(who: Admin, engine: Db, device_id: str) -> schemas.Credential:
    """A new credential. The old one stops working at once; a device connected with it
    is disconnected, on whichever hub and transport."""
    return schemas.Credential(id=device_id, credential=actions.rekey_device(engine, who, device_id))


@router.get(
    "/{device_id}/telemetry",
    response_model=schemas.TelemetryPage,
    responses={
        **ERRORS,
        404: {"model": schemas.Problem},
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
)
def telemetry(
    _: Viewer,
    engine: Db,
    device_id: str,
    since: Annotated[datetime | None, Query(description="After this time (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Up to this time.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Any:
    """Telemetry rows, newest first; `format=csv` for a spreadsheet."""
    if fleet.get_device(engine, device_id) is None:
        raise actions.NotFound(f"no device {device_id!r}")
    rows = fleet.telemetry(engine, device_id, since=since, until=until, limit=limit)
    if format == "csv":
        return PlainTextResponse(
            to_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{device_id}-telemetry.csv"'},
        )
    # Up to 10,000 rows: written straight to JSON (the shape is `TelemetryPage`'s)
    # rather than built as models and validated again on the way out.
    body = {
        "device": device_id,
        "items": [
            {
                "received_at": r.received_at.isoformat(),
                "device_time": r.device_time.isoformat() if r.device_time else None,
                "seq": r.seq,
                "values": r.values,
            }
            for r in rows
        ],
    }
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def to_csv(rows: list[fleet.TelemetryPoint]) -> str:
    fields = sorted({key for row in rows for key in row.values})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["received_at", "device_time", "seq", *fields])
    for r in rows:
        writer.writerow(
            [
                r.received_at.isoformat(),
                r.device_time.isoformat() if r.device_time else "",
                "" if r.seq is None else r.seq,
                *[r.values.get(f, "") for f in fields],
            ]
        )
    return out.getvalue()


@router.post(
    "/{device_id}/commands",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ERRORS, 404: {"model": schemas.Problem}, 503: {"model": schemas.Problem}},
)
def send_command(
    who: Operator, engine: Db, device_id: str, body: Annotated[schemas.NewCommand, Body()]
) -> schemas.CommandAccepted:
    """Send a command; follow it with `GET /api/commands/{id}` or the event stream.
    While no hub holds the device, it waits in the database until its ttl."""
    return schemas.CommandAccepted(
        id=actions.send_command(engine, who, device_id, body.name, body.args, body.ttl)
    )
