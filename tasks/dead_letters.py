"""Dead letters from the worker's side: record one, and replay one by task name.

Layer: tasks; imports the `hub` core only.

`record` is what every task uses for what it cannot process (hub.dead_letters
holds the table and the functions that read and change it); `replay` sends
a dead letter's task again through Celery, by name, to the queue its task
is routed to.
"""

from __future__ import annotations

import logging

from hub import dead_letters, worker_metrics
from hub.dead_letters import NewDeadLetter
from tasks.application import app, worker_name
from tasks.db import engine

log = logging.getLogger(__name__)


def record(letter: NewDeadLetter) -> str | None:
    """Store a dead letter and count it; None (logged with the letter) if the
    database refuses, so that one failure cannot stop the rest of a batch."""
    try:
        letter_id = dead_letters.record(engine(), letter)
        worker_metrics.add(engine(), worker_name(), {worker_metrics.DEAD_LETTERS: 1})
    except Exception:  # boundary: the database; the letter must at least be in the log
        log.exception(
            "could not store a dead letter (%s from %s: %s): %.2000r",
            letter.reason,
            letter.source,
            letter.error,
            letter.envelope if letter.raw is None else letter.raw,
        )
        return None
    log.error(
        "dead letter %s: %s from %s: %s (hub dead-letters show %s)",
        letter_id,
        letter.reason,
        letter.source,
        letter.error,
        letter_id,
    )
    return letter_id


def replay(letter_id: str) -> str:
    """Send dead letter `letter_id`'s task again; returns the new task's id.

    The letter becomes `replayed` first (so it is replayed once); if the task
    cannot be sent, it is `dead` again and the error is raised.
    """
    claim = dead_letters.claim_replay(engine(), letter_id)
    try:
        result = app.send_task(claim.task_name, args=claim.args)
    except BaseException:
        dead_letters.release_replay(engine(), letter_id)
        raise
    return str(result.id)
