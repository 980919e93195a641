"""`/api/commands/{id}`: a command's status and the device's reply.

Layer: console.
"""

from __future__ import annotations

from fastapi import APIRouter

from console import actions, schemas
from console.deps import Db, Viewer

router = APIRouter(prefix="/api/commands", tags=["commands"])


def command(outcome: actions.CommandOutcome) -> schemas.Command:
    info = outcome.info
    return schemas.Command(
        id=info.id,
        device=info.device_id,
        name=info.name,
        args=info.args,
        status=info.status,  # type: ignore[arg-type]  # the table holds only these
        result=outcome.result,
        error=outcome.error,
        created_at=info.created_at,
        finished_at=info.finished_at,
    )


@router.get("/{command_id}", responses={404: {"model": schemas.Problem}})
def get_command(_: Viewer, engine: Db, command_id: str) -> schemas.Command:
    """pending, delivered (handed to the device), succeeded, failed or expired."""
    return command(actions.command_outcome(engine, command_id))
