"""Where each kind of envelope goes: task names and queues.

Layer: core; imports only `hub.envelope` (and kombu's declarative queue types).

Bridges send tasks by name (they never import `tasks`), and the worker's
`task_routes` come from the same table, so the two cannot drift apart.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from hub.envelope import Kind

#: One ingest task per kind; each takes a list of envelope dicts (a batch).
INGEST_TASKS: dict[Kind, str] = {
    Kind.TELEMETRY: "tasks.ingest.telemetry",
    Kind.EVENT: "tasks.ingest.event",
    Kind.STATE: "tasks.ingest.state",
    Kind.COMMAND_RESULT: "tasks.ingest.command_result",
    Kind.PRESENCE: "tasks.ingest.presence",
}

QUEUES: dict[Kind, str] = {
    Kind.TELEMETRY: "hub.telemetry",
    Kind.EVENT: "hub.events",
    Kind.STATE: "hub.state",
    Kind.COMMAND_RESULT: "hub.command_results",
    Kind.PRESENCE: "hub.presence",
}

#: Fails a command whose time to live passed (scheduled by send_command).
COMMAND_EXPIRE_TASK = "tasks.commands.expire"

#: Queue of user handler runs (one task per envelope and handler).
HANDLER_QUEUE = "hub.handlers"
# Handler runs that failed every retry, and anything else a worker cannot
# process, become dead letters in the database (hub.dead_letters), not a queue.


#: The direct exchange every hub queue is bound to (routing key = queue name).
EXCHANGE = "hub"


def celery_queues() -> list[Queue]:
    """Durable queue declarations shared by publishers and workers.

    Publishers declare them too: a confirm from RabbitMQ means "stored" only if
    a durable queue was there to take the message.
    """
    exchange = Exchange(EXCHANGE, type="direct", durable=True)
    return [Queue(name, exchange, routing_key=name, durable=True) for name in all_queues()]


def task_routes() -> dict[str, dict[str, str]]:
    """Celery `task_routes` for the ingest tasks."""
    routes = {INGEST_TASKS[kind]: {"queue": QUEUES[kind]} for kind in Kind}
    routes[COMMAND_EXPIRE_TASK] = {"queue": QUEUES[Kind.COMMAND_RESULT]}
    return routes


def all_queues() -> list[str]:
    return [*QUEUES.values(), HANDLER_QUEUE]
