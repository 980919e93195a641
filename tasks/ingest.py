"""Built-in ingest tasks: store a batch of envelopes and keep device state.

Layer: tasks; imports the `hub` core only.

Each task receives a batch (a list of envelope dicts) published by the
dispatcher; it stores the whole batch in one transaction, idempotently on the
envelope id, so a redelivered or retransmitted message is stored once. A bad
envelope is logged and dropped (never retried); a database error is retried.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError

import tasks.application
from hub.envelope import Envelope
from hub.errors import EnvelopeError
from hub.storage import store_envelopes
from tasks import handlers
from tasks.application import app
from tasks.commands import complete_commands
from tasks.db import engine

log = logging.getLogger(__name__)


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
    """Store a batch, then queue the user handlers; returns how many messages were new."""
    envelopes = parse_batch(batch)
    if not envelopes:
        return 0
    modules = tasks.application.settings.handlers
    # Handlers only for what is new: a redelivered batch or a retransmission
    # must not run them again (scheduled inside the storing transaction).
    return store_envelopes(
        engine(),
        envelopes,
        before_commit=(lambda new: handlers.schedule(new, modules)) if modules else None,
    )


_RETRY: dict[str, Any] = {
    # A database error, or the broker refusing the handler runs scheduled in
    # the storing transaction (which then stored nothing): both are worth a retry.
    "autoretry_for": (OperationalError, KombuOperationalError),
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
    return complete_commands(parse_batch(batch))
