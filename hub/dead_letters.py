"""Dead letters: what a worker could not process, kept in the database for people.

Layer: core; imports only `hub.errors`, `hub.envelope` and `hub.storage`. No Celery:
replaying is sending a task by name, which `tasks.dead_letters.replay` does
with what `claim_replay` returns.

A dead letter is one envelope (or one raw task message) with why it failed:
a bad envelope inside a batch, an envelope the database refused, a user
handler that failed every retry, a task message the worker could not decode.
Rows start `dead`; an operator replays them (`replayed`) or discards them
(`discarded`) with `hub dead-letters` or the console. See docs/results.md,
"Dead letters".

The function names here are an interface other parts build on (the console):
keep them stable.
"""

from __future__ import annotations

import json
import reprlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Index, Integer, String, Text, func, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column

from hub.errors import HubError
from hub.storage import Base, UtcDateTime

DEAD = "dead"
REPLAYED = "replayed"
DISCARDED = "discarded"
STATUSES = (DEAD, REPLAYED, DISCARDED)

#: Reason codes (short, stable, for filtering).
INVALID_ENVELOPE = "invalid_envelope"
TOO_DEEP = "too_deep"
STORE_FAILED = "store_failed"
HANDLER_FAILED = "handler_failed"
UNDECODABLE = "undecodable"

#: The stored payload text is cut here: a dead letter is for reading and
#: replaying one envelope, and a raw task message can be a whole batch.
MAX_PAYLOAD_CHARS = 1024 * 1024


class DeadLetterError(HubError):
    """A dead letter does not exist or cannot do what was asked (replay, discard)."""


class DeadLetter(Base):
    """One dead letter (the `dead_letters` table, migration 0003_dead_letters)."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    source: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(32))
    error: Mapped[str] = mapped_column(Text)
    envelope_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    payload: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    #: The task a replay sends, and its arguments as JSON; None when there is
    #: nothing to replay (a message that could not be decoded).
    task_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    task_args: Mapped[str | None] = mapped_column(Text, nullable=True)


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    """What a worker records. `envelope` is the envelope dict where there is one,
    `raw` the undecoded text otherwise; `task_args` what a replay sends to `task_name`."""

    source: str
    reason: str
    error: str
    envelope: Any = None
    raw: str | None = None
    attempts: int = 1
    task_name: str | None = None
    task_args: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """A claimed replay: send `task_name` with `args`, then the row stays `replayed`."""

    id: str
    task_name: str
    args: list[Any]


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxdict, _SHORT_REPR.maxlist = 16, 64, 64
_SHORT_REPR.maxstring, _SHORT_REPR.maxother = 4096, 256


def _text(value: Any) -> str:
    """JSON text of `value`, or its repr when it cannot be (too deep, not JSON-safe)."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        # reprlib stops at a fixed depth, so it cannot recurse out of the stack.
        text = value if isinstance(value, str) else _SHORT_REPR.repr(value)
    return text[:MAX_PAYLOAD_CHARS]


def _field(envelope: Any, name: str, limit: int) -> str | None:
    value = envelope.get(name) if isinstance(envelope, dict) else None
    return value[:limit] if isinstance(value, str) else None


def record(engine: Engine, letter: NewDeadLetter) -> str:
    """Store a dead letter; returns its id."""
    now = datetime.now(UTC)
    letter_id = str(uuid.uuid4())
    payload = _text(letter.envelope) if letter.raw is None else letter.raw[:MAX_PAYLOAD_CHARS]
    task_args = None
    if letter.task_name is not None and letter.task_args is not None:
        task_args = _text(letter.task_args)
    with engine.begin() as conn:
        conn.execute(
            insert(DeadLetter),
            {
                "id": letter_id,
                "created_at": now,
                "updated_at": now,
                "source": letter.source[:200],
                "reason": letter.reason[:32],
                "error": letter.error,
                "envelope_id": _field(letter.envelope, "id", 64),
                "device_id": _field(letter.envelope, "device_id", 128),
                "payload": payload,
                "attempts": letter.attempts,
                "status": DEAD,
                "task_name": letter.task_name if task_args is not None else None,
                "task_args": task_args,
            },
        )
    return letter_id


def _summary(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    data["replayable"] = data.pop("task_name", None) is not None and data["status"] == DEAD
    data.pop("task_args", None)
    return data


def list_dead_letters(
    engine: Engine, *, status: str | None = DEAD, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """Dead letters, newest first, without their payload; `status=None` lists all."""
    table = DeadLetter.__table__
    columns = [c for c in table.c if c.name != "payload"]
    query = select(*columns).order_by(table.c.created_at.desc(), table.c.id).limit(limit)
    if offset:
        query = query.offset(offset)
    if status is not None:
        query = query.where(table.c.status == status)
    with engine.connect() as conn:
        return [_summary(row) for row in conn.execute(query)]


def count_dead_letters(engine: Engine) -> dict[str, int]:
    """How many dead letters there are in each status."""
    table = DeadLetter.__table__
    counts = dict.fromkeys(STATUSES, 0)
    with engine.connect() as conn:
        for status, count in conn.execute(
            select(table.c.status, func.count()).group_by(table.c.status)
        ):
            counts[str(status)] = int(count)
    return counts


def get_dead_letter(engine: Engine, letter_id: str) -> dict[str, Any]:
    """One dead letter with its payload; DeadLetterError if there is none."""
    table = DeadLetter.__table__
    with engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.id == letter_id)).first()
    if row is None:
        raise DeadLetterError(f"no dead letter {letter_id!r}")
    data = _summary(row)
    data["payload"] = row.payload
    data["task_name"] = row.task_name
    return data


def _set_status(engine: Engine, letter_id: str, new: str, *, expect: str = DEAD) -> None:
    with engine.begin() as conn:
        result = conn.execute(
            update(DeadLetter)
            .where(DeadLetter.id == letter_id, DeadLetter.status == expect)
            .values(status=new, updated_at=datetime.now(UTC))
        )
    if result.rowcount != 1:
        current = get_dead_letter(engine, letter_id)["status"]  # raises if missing
        raise DeadLetterError(f"dead letter {letter_id} is {current}, not {expect}")


def mark_replayed(engine: Engine, letter_id: str) -> None:
    """Move a `dead` letter to `replayed`; DeadLetterError if it is not `dead`."""
    _set_status(engine, letter_id, REPLAYED)


def mark_discarded(engine: Engine, letter_id: str) -> None:
    """Move a `dead` letter to `discarded`; DeadLetterError if it is not `dead`."""
    _set_status(engine, letter_id, DISCARDED)


def claim_replay(engine: Engine, letter_id: str) -> Replay:
    """Mark a `dead` letter `replayed` and return what to send.

    Claiming first means two operators cannot both replay one letter; a sender
    that then fails calls `release_replay`. Replayed tasks are idempotent on
    the envelope id, so a replay of something already stored stores nothing.
    """
    letter = get_dead_letter(engine, letter_id)
    table = DeadLetter.__table__
    with engine.connect() as conn:
        task_args = conn.execute(select(table.c.task_args).where(table.c.id == letter_id)).scalar()
    if letter["task_name"] is None or task_args is None:
        raise DeadLetterError(
            f"dead letter {letter_id} ({letter['reason']}) has no task to replay; "
            "read it with `hub dead-letters show`, then discard it"
        )
    args = json.loads(task_args)
    mark_replayed(engine, letter_id)
    return Replay(letter_id, letter["task_name"], args)


def release_replay(engine: Engine, letter_id: str) -> None:
    """Undo `claim_replay` after the task could not be sent."""
    _set_status(engine, letter_id, DEAD, expect=REPLAYED)
