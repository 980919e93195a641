"""Where each kind of envelope goes: task names and queues.

Layer: core; imports only `hub.envelope` (no kombu: the queue declarations are
built from this table by `tasks.application.celery_queues` for workers and
`bridges.queues.celery_queues` for publishers).

Bridges send tasks by name (they never import `tasks`), and the worker's
`task_routes` come from the same table, so the two cannot drift apart.
"""

from __future__ import annotations

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


#: The direct exchange every hub queue is bound to (routing key = queue name);
#: it and every queue are durable.
EXCHANGE = "hub"

#: With quorum queues, a topic exchange instead (routing key = queue name as
#: well): Celery's native delayed delivery, which carries the command expiry's
#: countdown, cannot route through a direct exchange, and a worker would
#: otherwise hold each delayed task in its fixed prefetch (no global QoS on
#: quorum queues). A name of its own, since an exchange's type never changes.
QUORUM_EXCHANGE = "hub.quorum"

#: Where RabbitMQ moves a message of a quorum queue delivered more than
#: `broker_delivery_limit` times (it made workers die each time), rather than
#: dropping it. Nobody consumes it; `hub status` shows its depth.
UNDELIVERABLE_QUEUE = "hub.undeliverable"


def exchange_for(queue_type: str) -> tuple[str, str]:
    """The exchange's name and type for this `broker_queue_type`."""
    return (QUORUM_EXCHANGE, "topic") if queue_type == "quorum" else (EXCHANGE, "direct")


def queue_arguments(queue_type: str, delivery_limit: int) -> dict[str, object] | None:
    """The `x-` arguments every hub queue is declared with (None for classic).

    Quorum queues have no priorities (none are used) and no global QoS
    (Celery's `worker_detect_quorum_queues` turns it off for them).
    """
    if queue_type != "quorum":
        return None
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": UNDELIVERABLE_QUEUE,
    }


def task_routes() -> dict[str, dict[str, str]]:
    """Celery `task_routes` for the ingest tasks."""
    routes = {INGEST_TASKS[kind]: {"queue": QUEUES[kind]} for kind in Kind}
    routes[COMMAND_EXPIRE_TASK] = {"queue": QUEUES[Kind.COMMAND_RESULT]}
    return routes


def all_queues() -> list[str]:
    """Every hub queue's name (each bound to the exchange under its own name)."""
    return [*QUEUES.values(), HANDLER_QUEUE]
