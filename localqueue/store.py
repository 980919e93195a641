"""The local queue's storage: task messages in one SQLite file, handed out on lease.

Layer: localqueue; the standard library and psutil only (the kombu side is
`localqueue.transport`).

A row is one message. `put` returns once the row is committed (WAL,
`synchronous=FULL`), so a publish that returned is on disk. `claim` hands out
the oldest visible row of a queue and hides it until its lease ends, under an
owner token that names the process (host, pid, start time). While the process
lives, a renewer thread extends its leases, so a task may take as long as it
needs. `ack` deletes the row (what was processed leaves no trace), `release`
makes it visible again at once (a warm shutdown, a requeue).

A consumer that dies holding rows loses nothing: its rows come back when the
lease ends (`LEASE_S`) even if nothing else notices, and as soon as any
process of the queue sees that the owner process is gone (at open, then every
`REAP_EVERY_S`), which is how the supervisor's new worker picks up at once
what a killed worker held.

While a consumer thread handles a message, the messages it publishes into the
same file wait in its outbox (`deliver`) and are committed in one transaction
with that message's `ack`: a worker killed in the middle of a task has
published none of what the task sends (its redelivery sends them once), and
one that finished has published all of it. See docs/delivery.md ("The local
queue").
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: How long a handed-out message stays hidden without a renewal.
LEASE_S = 30.0
#: How often a living process extends the leases it holds.
RENEW_EVERY_S = LEASE_S / 3
#: How often a process looks for rows held by processes that are gone.
REAP_EVERY_S = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    visible_at REAL NOT NULL DEFAULT 0,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_messages_by_queue ON queue_messages (queue, id);
CREATE INDEX IF NOT EXISTS queue_messages_by_owner ON queue_messages (owner)
    WHERE owner IS NOT NULL;
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message handed out to this process: its row id, body and delivery count."""

    id: int
    payload: str
    deliveries: int


@dataclass(slots=True)
class _Outbox:
    """What one thread publishes while it handles message `for_id`."""

    for_id: int
    puts: list[tuple[str, str]] = field(default_factory=list)


def owner_token(pid: int | None = None) -> str:
    """`host/pid/start time`: unique to one process, even when pids are reused."""
    process = psutil.Process(pid)
    return f"{socket.gethostname()}/{process.pid}/{process.create_time():.2f}"


def owner_gone(owner: str) -> bool:
    """True when `owner` names a process of this host that no longer runs.

    A process of another host is never judged (its rows come back when the
    lease ends). A zombie counts as gone: it will never ack.
    """
    try:
        host, pid_text, started_text = owner.rsplit("/", 2)
        pid, started = int(pid_text), float(started_text)
    except ValueError:
        return True
    if host != socket.gethostname():
        return False
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) > 1.0:
            return True  # the pid now belongs to another process
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False  # not ours to inspect: wait for the lease to end


class Store:
    """One process's connection to one queue file; safe to share between threads."""

    def __init__(self, path: Path, *, lease_s: float = LEASE_S) -> None:
        self.path = path
        self.lease_s = lease_s
        self.owner = owner_token()
        # One connection per process, guarded by a lock: the hub's publisher
        # and its command consumer are threads of one process. SQLite itself
        # serializes writers across processes (busy timeout, WAL).
        self._db = sqlite3.connect(
            str(path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed publish survives a power loss, as the spool's does.
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_SCHEMA)
            self._adopt_kombu_tables()
        self._next_reap = 0.0
        self._outboxes = threading.local()
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()

    def _adopt_kombu_tables(self) -> None:
        """Take over the messages a hub with kombu's SQLAlchemy transport left here.

        That transport kept every message ever sent (`visible = 0` once handed
        out, processed or not); the visible ones were never handed out, so they
        move into the queue, and the old tables go.
        """
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'kombu_message'"
        ).fetchone()
        if found is None:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'kombu_message'"
            ).fetchone():
                self._db.execute(
                    "INSERT INTO queue_messages (queue, payload) "
                    "SELECT q.name, m.payload FROM kombu_message AS m "
                    "JOIN kombu_queue AS q ON q.id = m.queue_id "
                    "WHERE m.visible = 1 ORDER BY m.id"
                )
                self._db.execute("DROP TABLE kombu_message")
                self._db.execute("DROP TABLE IF EXISTS kombu_queue")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- publishing ------------------------------------------------------------

    def put(self, queue: str, payload: str) -> None:
        """Append a message: committed when this returns, or with the ack of the
        message this thread is handling (see `deliver`)."""
        outbox: _Outbox | None = getattr(self._outboxes, "current", None)
        if outbox is not None:
            outbox.puts.append((queue, payload))
            return
        with self._lock:
            self._db.execute(
                "INSERT INTO queue_messages (queue, payload) VALUES (?, ?)", (queue, payload)
            )

    @contextmanager
    def deliver(self, message_id: int) -> Iterator[None]:
        """While this thread handles `message_id`, hold what it publishes for its ack.

        Whatever is still held when the handling ends (the message was not
        acknowledged in it, or was acknowledged before its task ran) is
        committed then.
        """
        self._outboxes.current = _Outbox(message_id)
        try:
            yield
        finally:
            outbox: _Outbox | None = self._outboxes.current
            self._outboxes.current = None
            if outbox is not None and outbox.puts:
                self._commit(outbox.puts, ack=None)

    def _commit(self, puts: list[tuple[str, str]], ack: int | None) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO queue_messages (queue, payload) VALUES (?, ?)", puts
                )
                if ack is not None:
                    self._db.execute("DELETE FROM queue_messages WHERE id = ?", (ack,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- consuming -------------------------------------------------------------

    def claim(self, queue: str) -> Claimed | None:
        """Hand out the oldest visible message of `queue` on lease, or None."""
        self.reap_if_due()
        self._start_renewer()
        while True:
            now = time.time()
            with self._lock:
                row = self._db.execute(
                    "SELECT id FROM queue_messages WHERE queue = ? AND visible_at <= ? "
                    "ORDER BY id LIMIT 1",
                    (queue, now),
                ).fetchone()
                if row is None:
                    return None
                # The read is outside any write lock (cheap polling); the
                # update claims only if no other process claimed it meanwhile.
                got = self._db.execute(
                    "UPDATE queue_messages SET visible_at = ?, owner = ?, "
                    "deliveries = deliveries + 1 WHERE id = ? AND visible_at <= ? "
                    "RETURNING payload, deliveries",
                    (now + self.lease_s, self.owner, row[0], now),
                ).fetchall()
            if got:
                return Claimed(int(row[0]), str(got[0][0]), int(got[0][1]))

    def ack(self, message_id: int) -> None:
        """Done with a message: delete it, with what its handling published."""
        outbox: _Outbox | None = getattr(self._outboxes, "current", None)
        if outbox is not None and outbox.for_id == message_id:
            self._outboxes.current = None
            self._commit(outbox.puts, ack=message_id)
            return
        with self._lock:
            self._db.execute("DELETE FROM queue_messages WHERE id = ?", (message_id,))

    def release(self, message_id: int) -> None:
        """Give a message back now (only if this process still holds it)."""
        with self._lock:
            self._db.execute(
                "UPDATE queue_messages SET visible_at = 0, owner = NULL WHERE id = ? AND owner = ?",
                (message_id, self.owner),
            )

    def renew(self) -> None:
        """Extend every lease this process holds."""
        with self._lock:
            self._db.execute(
                "UPDATE queue_messages SET visible_at = ? WHERE owner = ?",
                (time.time() + self.lease_s, self.owner),
            )

    def reap(self) -> int:
        """Give back at once the messages held by processes that are gone."""
        with self._lock:
            owners = [
                r[0]
                for r in self._db.execute(
                    "SELECT DISTINCT owner FROM queue_messages WHERE owner IS NOT NULL"
                )
            ]
        returned = 0
        for owner in owners:
            if owner == self.owner or not owner_gone(owner):
                continue
            with self._lock:
                cursor = self._db.execute(
                    "UPDATE queue_messages SET visible_at = 0, owner = NULL WHERE owner = ?",
                    (owner,),
                )
                returned += cursor.rowcount
        return returned

    def reap_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + REAP_EVERY_S
            self.reap()

    def _start_renewer(self) -> None:
        if self._renewer is not None:
            return
        self._renewer = threading.Thread(
            target=self._renew_forever, name="localqueue-lease", daemon=True
        )
        self._renewer.start()

    def _renew_forever(self) -> None:
        while not self._closed.wait(RENEW_EVERY_S):
            try:
                self.renew()
            except sqlite3.Error:
                # A busy or failing disk: try again next round; the lease is
                # three rounds long.
                continue

    # -- queue management --------------------------------------------------------

    def size(self, queue: str) -> int:
        """Messages waiting (visible) in `queue`, as RabbitMQ counts ready messages."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM queue_messages WHERE queue = ? AND visible_at <= ?",
                (queue, time.time()),
            ).fetchone()
        return int(row[0])

    def purge(self, queue: str) -> int:
        """Delete the waiting messages of `queue`; returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM queue_messages WHERE queue = ? AND visible_at <= ?",
                (queue, time.time()),
            )
            return cursor.rowcount

    def delete_queue(self, queue: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM queue_messages WHERE queue = ?", (queue,))

    def total(self) -> int:
        """Every message in the file, waiting or handed out."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM queue_messages").fetchone()[0])

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._db.close()


_stores: dict[tuple[int, str], Store] = {}
_stores_lock = threading.Lock()


def open_store(path: Path) -> Store:
    """The store of this process for `path` (a new one after a fork)."""
    key = (os.getpid(), str(path))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = Store(path)
        return store
