"""The audit log: who changed what, when, and on what target.

Layer: core; imports `hub.storage`. Written by the console (and the `hub`
commands that change accounts) next to every change: a device added, removed
or re-keyed, a command sent, a dead letter replayed or discarded, a user or
token added or removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Engine, Index, Integer, String, insert, select
from sqlalchemy.orm import Mapped, mapped_column

from hub.storage import Base, UtcDateTime


class AuditRow(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


def record(
    engine: Engine, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    """Append one entry (`actor` as `user:alice` or `token:ci`, `action` as `device.add`)."""
    with engine.begin() as conn:
        conn.execute(
            insert(AuditRow).values(
                at=datetime.now(UTC),
                actor=actor,
                action=action,
                target=target,
                detail=detail or {},
            )
        )


def recent(engine: Engine, limit: int = 200) -> list[AuditEntry]:
    """The newest entries first."""
    query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [AuditEntry(r.id, r.at, r.actor, r.action, r.target, dict(r.detail)) for r in rows]
