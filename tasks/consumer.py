"""The worker's consumer: a task message it cannot decode becomes a dead letter.

Layer: tasks; imports the `hub` core and Celery only.

Celery's own consumer logs an undecodable message and acknowledges it, so it
is gone with every envelope inside, visible only in one worker's log; a
message naming a task this worker does not know, or one Celery finds
invalid, is rejected the same way. This one records the raw body as a dead
letter first (reasons `undecodable`, `unknown_task`, `invalid_task`), then
lets Celery acknowledge or reject it as before, so that it neither loops nor
disappears.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from hub.dead_letters import INVALID_TASK, UNDECODABLE, UNKNOWN_TASK, NewDeadLetter

log = logging.getLogger(__name__)


def _raw_text(message: Any) -> str:
    body = message.body
    if isinstance(body, memoryview):
        body = body.tobytes()
    if isinstance(body, (bytes, bytearray)):
        return bytes(body).decode("utf-8", errors="replace")
    return str(body)


def _record(message: Any, reason: str, exc: BaseException | None) -> None:
    from tasks.dead_letters import record  # imports the app, which names this module

    headers = message.headers if isinstance(message.headers, dict) else {}
    task = headers.get("task")
    error = f"{type(exc).__name__}: {exc}" if exc is not None else "not a task message"
    record(
        NewDeadLetter(
            source=str(task) if task else "worker",
            reason=reason,
            error=error[:2000],
            raw=_raw_text(message),
        )
    )


class HubConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _record(message, UNDECODABLE, exc)
        message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _record(message, UNKNOWN_TASK, exc)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _record(message, INVALID_TASK, exc)
        super().on_invalid_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _record(message, INVALID_TASK, None)
        super().on_unknown_message(body, message)
