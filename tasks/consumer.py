"""The worker's consumer: a task message it cannot decode becomes a dead letter.

Layer: tasks; imports the `hub` core and Celery only.

Celery's own consumer logs an undecodable message and acknowledges it, so it
is gone with every envelope inside, visible only in one worker's log. This
one records the raw body as a dead letter first (reason `undecodable`), then
acknowledges it, so that it neither loops nor disappears.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from hub.dead_letters import UNDECODABLE, NewDeadLetter

log = logging.getLogger(__name__)


def _raw_text(message: Any) -> str:
    body = message.body
    if isinstance(body, memoryview):
        body = body.tobytes()
    if isinstance(body, (bytes, bytearray)):
        return bytes(body).decode("utf-8", errors="replace")
    return str(body)


class HubConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        from tasks.dead_letters import record

        headers = message.headers if isinstance(message.headers, dict) else {}
        task = headers.get("task")
        record(
            NewDeadLetter(
                source=str(task) if task else "worker",
                reason=UNDECODABLE,
                error=f"{type(exc).__name__}: {exc}"[:2000],
                raw=_raw_text(message),
            )
        )
        message.ack()
