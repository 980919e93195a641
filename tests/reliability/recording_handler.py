"""A handler that records every envelope it sees, for the reliability suite.

Loaded by workers through the `handlers` setting. Its table has no unique key
on purpose: a message processed twice leaves two rows, which `compare()`
counts as a duplicate even though the telemetry table's key would hide it.
It writes through `tasks.handlers.transaction()`, as a handler that wants its
database writes exactly once does. It matches only devices named `rel-*`.
"""

from __future__ import annotations

import os

from sqlalchemy import text

from hub.envelope import Envelope
from tasks.handlers import handler, transaction

_created: set[str] = set()

_CREATE = (
    "CREATE TABLE IF NOT EXISTS reliability_handler_runs ("
    " envelope_id VARCHAR(64) NOT NULL, device_id VARCHAR(128) NOT NULL,"
    " seq BIGINT, pid INTEGER NOT NULL)"
)


@handler(kind="telemetry", devices="rel-*")
def record(envelope: Envelope) -> None:
    conn = transaction()
    url = str(conn.engine.url)
    if url not in _created:
        conn.execute(text(_CREATE))
        _created.add(url)
    conn.execute(
        text(
            "INSERT INTO reliability_handler_runs (envelope_id, device_id, seq, pid) "
            "VALUES (:e, :d, :s, :p)"
        ),
        {"e": envelope.id, "d": envelope.device_id, "s": envelope.seq, "p": os.getpid()},
    )
