"""The local spool: where batches wait, durably, while RabbitMQ is unreachable.

Layer: bridges; imports nothing from the project. Thread-confined: only the
dispatcher's publisher thread uses an instance.

A batch written here is on disk (SQLite, WAL, synchronous=FULL) before the
devices are acknowledged. Rows are replayed oldest first, so order is kept.
The spool is bounded by the number of envelopes it holds; the caller applies
backpressure when `has_room` is False instead of dropping anything.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    row_id: int
    task_name: str
    queue: str
    body: str
    count: int


class Spool:
    """A bounded, ordered, durable queue of task messages on local disk."""

    def __init__(self, path: Path, max_messages: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed row survives power loss, which is what an ACK promises.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " task_name TEXT NOT NULL, queue TEXT NOT NULL,"
            " body TEXT NOT NULL, count INTEGER NOT NULL)"
        )
        row = self._db.execute("SELECT COALESCE(SUM(count), 0) FROM spool").fetchone()
        self._messages = int(row[0])

    @property
    def messages(self) -> int:
        """Envelopes currently held."""
        return self._messages

    def has_room(self, count: int) -> bool:
        # An empty spool always takes a batch, so that a batch larger than the
        # bound cannot wedge the hub.
        return self._messages == 0 or self._messages + count <= self.max_messages

    def append(self, task_name: str, queue: str, body: str, count: int) -> None:
        self._db.execute(
            "INSERT INTO spool (task_name, queue, body, count) VALUES (?, ?, ?, ?)",
            (task_name, queue, body, count),
        )
        self._messages += count

    def oldest(self, limit: int) -> list[SpooledBatch]:
        rows = self._db.execute(
            "SELECT id, task_name, queue, body, count FROM spool ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [SpooledBatch(*row) for row in rows]

    def remove(self, batch: SpooledBatch) -> None:
        self._db.execute("DELETE FROM spool WHERE id = ?", (batch.row_id,))
        self._messages -= batch.count

    def remove_many(self, batches: list[SpooledBatch]) -> None:
        """Remove replayed batches in one transaction (one fsync, not one each)."""
        if not batches:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM spool WHERE id = ?", [(b.row_id,) for b in batches])
        self._messages -= sum(b.count for b in batches)

    def close(self) -> None:
        self._db.close()
