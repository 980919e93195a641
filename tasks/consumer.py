"""The worker's consumer: a task message it cannot decode becomes a dead letter.

Layer: tasks; imports the `hub` core and Celery only.

Celery's own consumer logs an undecodable message and acknowledges it, so it
is gone with every envelope inside, visible only in one worker's log; a
message naming a task this worker does not know, or one Celery finds
invalid, is rejected the same way. This one records the raw body as a dead
letter first (reasons `undecodable`, `unknown_task`, `invalid_task`), then
lets Celery acknowledge or reject it as before, so that it neither loops nor
disappears.

With quorum queues it also sets up Celery's native delayed delivery on the
first node of a cluster that answers (`ClusterDelayedDelivery`), not on every
node `broker_url` lists.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery

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


class ClusterDelayedDelivery(DelayedDelivery):  # type: ignore[misc]  # Celery is untyped
    """Celery's native delayed delivery (quorum queues), set up once per cluster.

    Celery declares its delay exchanges and queues on each node `broker_url`
    lists, retrying a node that refuses three times with 1, 3 and 5 s sleeps,
    and does so each time the worker reconnects: with one node of a cluster
    down, a worker that lost its node waited about 18 s on the dead one before
    it consumed again (tests/reliability/test_rabbitmq_cluster.py). Exchanges,
    queues and bindings belong to the whole cluster, so the first node that
    answers is enough; each is tried once, in the order listed.
    """

    def start(self, c: Any) -> None:
        app = c.app
        self._validate_configuration(app)
        urls = self._validate_broker_urls(app.conf.broker_url)
        errors = []
        for url in urls:
            try:
                self._setup_delayed_delivery(c, url)
                return
            except Exception as exc:  # boundary: a node that is down; try the next
                errors.append(f"{type(exc).__name__}: {exc}")
        log.error("native delayed delivery could not be set up on any node: %s", "; ".join(errors))


class HubConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps = [
            "tasks.consumer:ClusterDelayedDelivery" if step.endswith(":DelayedDelivery") else step
            for step in Consumer.Blueprint.default_steps
        ]

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
