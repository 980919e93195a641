"""Built-in ingest tasks: store a batch of envelopes and keep device state.

Layer: tasks; imports the `hub` core only.

Each task receives a batch (a list of envelope dicts) published by the
dispatcher; it stores the whole batch in one transaction, idempotently on the
envelope id, so a redelivered or retransmitted message is stored once. A bad
envelope is logged and dropped (never retried); a database error is retried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from hub.envelope import Envelope
from hub.errors import EnvelopeError
from hub.storage import make_engine, store_envelopes
from tasks.app import app, settings

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_pid = 0


def engine() -> Engine:
    """One engine per worker process (created after the fork, never inherited)."""
    global _engine, _engine_pid
    if _engine is None or _engine_pid != os.getpid():
        _engine = make_engine(settings.effective_database_url)
        _engine_pid = os.getpid()
    return _engine


def parse_batch(batch: list[dict[str, Any]]) -> list[Envelope]:
    """The valid envelopes of a batch; invalid ones are logged and skipped."""
    envelopes = []
    for item in batch:
        try:
            envelopes.append(Envelope.from_dict(item))
        except EnvelopeError as exc:
            log.error("dropping an invalid envelope (%s): %.200r", exc, item)
    return envelopes


def ingest(batch: list[dict[str, Any]]) -> int:
    """Store a batch; returns how many messages were new."""
    envelopes = parse_batch(batch)
    if not envelopes:
        return 0
    return store_envelopes(engine(), envelopes)


_RETRY: dict[str, Any] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "max_retries": 8,
    "ignore_result": True,
    "acks_late": True,
}


@app.task(name="tasks.ingest.telemetry", **_RETRY)
def telemetry(batch: list[dict[str, Any]]) -> int:
    return ingest(batch)


@app.task(name="tasks.ingest.event", **_RETRY)
def event(batch: list[dict[str, Any]]) -> int:
    return ingest(batch)


@app.task(name="tasks.ingest.state", **_RETRY)
def state(batch: list[dict[str, Any]]) -> int:
    return ingest(batch)


@app.task(name="tasks.ingest.presence", **_RETRY)
def presence(batch: list[dict[str, Any]]) -> int:
    return ingest(batch)


@app.task(name="tasks.ingest.command_result", **_RETRY)
def command_result(batch: list[dict[str, Any]]) -> int:
    # Storing command results and completing their AsyncResults comes with the
    # command path; until then they are validated and kept as events would be.
    return len(parse_batch(batch))
