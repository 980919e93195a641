"""`/api/dead-letters`: what the workers could not process, to read, replay or discard.

Layer: console. The table and its rules are `hub.dead_letters`; a replay sends
the task again by name (`tasks.dead_letters.replay`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status

from console import actions, schemas
from console.deps import Db, Operator, Viewer
from hub import dead_letters

router = APIRouter(prefix="/api/dead-letters", tags=["dead letters"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Problem},
    409: {"model": schemas.Problem},
}


def letter(row: dict[str, Any]) -> schemas.DeadLetter:
    return schemas.DeadLetter.model_validate(
        {k: v for k, v in row.items() if k in schemas.DeadLetter.model_fields}
    )


@router.get("")
def list_dead_letters(
    _: Viewer,
    engine: Db,
    status_: Annotated[
        Literal["dead", "replayed", "discarded", "all"], Query(alias="status")
    ] = "dead",
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.DeadLetterPage:
    """Newest first, without payloads; `status=all` for every one."""
    rows = dead_letters.list_dead_letters(
        engine, status=None if status_ == "all" else status_, limit=limit, offset=offset
    )
    return schemas.DeadLetterPage(
        items=[letter(r) for r in rows], counts=dead_letters.count_dead_letters(engine)
    )


@router.get("/{letter_id}", responses=NOT_FOUND)
def get_dead_letter(_: Viewer, engine: Db, letter_id: str) -> schemas.DeadLetter:
    """One dead letter with its payload."""
    return letter(actions.dead_letter(engine, letter_id))


@router.post("/{letter_id}/replay", responses=NOT_FOUND)
def replay(who: Operator, engine: Db, letter_id: str) -> schemas.Replayed:
    """Send its task again, once (it becomes `replayed`)."""
    return schemas.Replayed(
        id=letter_id, task_id=actions.replay_dead_letter(engine, who, letter_id)
    )


@router.delete("/{letter_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
def discard(who: Operator, engine: Db, letter_id: str) -> Response:
    """Give up on it (it becomes `discarded` and stays readable)."""
    actions.discard_dead_letter(engine, who, letter_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
