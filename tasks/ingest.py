"""Built-in ingest tasks: store a batch of envelopes and keep device state.

Layer: tasks; imports the `hub` core only.

Each task receives a batch (a list of envelope dicts) published by the
dispatcher; it stores the whole batch in one transaction, idempotently on the
envelope id, so a redelivered or retransmitted message is stored once.

No single envelope can poison a batch: an envelope that does not validate
(or that the worker's decoder quarantined for its depth, tasks/wire.py) goes
to the dead letters with its reason, and the rest is stored. If the database
refuses the batch for its content, the envelopes are stored one by one and
only those it refuses are dead-lettered. A database that is away
(OperationalError) is retried, the whole batch again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery import current_task
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

import tasks.application
from hub import worker_metrics
from hub.dead_letters import INVALID_ENVELOPE, STORE_FAILED, TOO_DEEP, NewDeadLetter
from hub.envelope import Envelope
from hub.errors import EnvelopeError
from hub.payloads import PayloadTooDeep
from hub.storage import store_envelopes
from tasks import handlers
from tasks.application import app, worker_name
from tasks.commands import complete_commands
from tasks.db import engine
from tasks.dead_letters import record
from tasks.wire import QUARANTINE_KEY

log = logging.getLogger(__name__)


def _dead_letter(task_name: str, item: Any, reason: str, error: str) -> None:
    quarantined = isinstance(item, dict) and QUARANTINE_KEY in item
    record(
        NewDeadLetter(
            source=task_name,
            reason=reason,
            error=error[:2000],
            envelope=item,
            # A quarantined item is a summary: there is nothing to send again.
            task_name=None if quarantined else task_name,
            task_args=None if quarantined else [[item]],
        )
    )


def parse_batch(batch: Any, task_name: str = "tasks.ingest") -> list[Envelope]:
    """The valid envelopes of a batch; every other item goes to the dead letters."""
    if not isinstance(batch, list):
        _dead_letter(task_name, batch, INVALID_ENVELOPE, "a batch must be a list of envelopes")
        return []
    envelopes = []
    for item in batch:
        if isinstance(item, dict) and QUARANTINE_KEY in item:
            _dead_letter(
                task_name, item, TOO_DEEP, "envelope nested too deeply to hand to the task"
            )
            continue
        try:
            envelopes.append(Envelope.from_dict(item))
        except PayloadTooDeep as exc:
            _dead_letter(task_name, item, TOO_DEEP, str(exc))
        except EnvelopeError as exc:
            _dead_letter(task_name, item, INVALID_ENVELOPE, str(exc))
        except Exception as exc:  # boundary: one envelope must not fail its batch
            _dead_letter(task_name, item, INVALID_ENVELOPE, f"{type(exc).__name__}: {exc}")
    return envelopes


def store(
    envelopes: list[Envelope],
    task_name: str,
    before_commit: Callable[[list[Envelope]], object] | None = None,
) -> int:
    """Store envelopes in one transaction; if the database refuses the batch for
    its content, one by one, dead-lettering only what it refuses.

    `before_commit` (the handler runs) is called inside each storing
    transaction with what was new (`store_envelopes`)."""
    window = timedelta(hours=tasks.application.context().settings.retransmission_window_h)
    try:
        return store_envelopes(
            engine(),
            envelopes,
            before_commit=before_commit,
            retransmission_window=window,
            count_stored=_count_stored,
        )
    except (OperationalError, KombuOperationalError):
        raise  # the database or the broker is away: retry the task
    except Exception as exc:  # boundary: find the envelope the database refuses
        if len(envelopes) == 1:
            _dead_letter(
                task_name, envelopes[0].to_dict(), STORE_FAILED, f"{type(exc).__name__}: {exc}"
            )
            return 0
        log.warning("a batch of %d was refused (%s); storing one by one", len(envelopes), exc)
    return sum(store([envelope], task_name, before_commit) for envelope in envelopes)


def _count_stored(conn: Connection, stored: int) -> None:
    # In the storing transaction: one commit per batch, not a second one to count it.
    worker_metrics.add_in(conn, worker_name(), {worker_metrics.ROWS_STORED: stored})


def ingest(batch: Any, task_name: str = "tasks.ingest") -> int:
    """Store a batch, then queue the user handlers; returns how many messages were new."""
    envelopes = parse_batch(batch, task_name)
    if not envelopes:
        return 0
    modules = tasks.application.context().settings.handlers
    # Handlers for what is new, scheduled inside the storing transaction. A
    # batch delivered again after a worker died (or retried after an error)
    # may have been stored while its handler runs never left: those go out
    # again for the whole batch, and the ledger skips the runs that happened.
    again = bool(modules) and _delivered_before()
    stored = store(
        envelopes,
        task_name,
        (lambda new: handlers.schedule(new, modules)) if modules and not again else None,
    )
    if again:
        handlers.schedule(list({e.id: e for e in envelopes}.values()), modules)
    return stored


def _delivered_before() -> bool:
    """True when the running task message was delivered before (a worker died
    holding it) or this is a retry of it."""
    request = current_task.request if current_task else None
    if request is None:
        return False
    info = request.delivery_info or {}
    return bool(info.get("redelivered")) or bool(request.retries)


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
    return ingest(batch, "tasks.ingest.telemetry")


@app.task(name="tasks.ingest.event", **_RETRY)
def event(batch: list[dict[str, Any]]) -> int:
    return ingest(batch, "tasks.ingest.event")


@app.task(name="tasks.ingest.state", **_RETRY)
def state(batch: list[dict[str, Any]]) -> int:
    return ingest(batch, "tasks.ingest.state")


@app.task(name="tasks.ingest.presence", **_RETRY)
def presence(batch: list[dict[str, Any]]) -> int:
    return ingest(batch, "tasks.ingest.presence")


@app.task(name="tasks.ingest.command_result", **_RETRY)
def command_result(batch: list[dict[str, Any]]) -> int:
    return complete_commands(parse_batch(batch, "tasks.ingest.command_result"))
