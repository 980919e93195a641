"""The hub's queues on the task broker: their declarations for the dispatcher,
their depths for `hub status`, and a connect that tries every listed node.

Layer: bridges; imports the `hub` core only.
"""

from __future__ import annotations

from kombu import Connection, Exchange, Queue

from hub.routing import UNDELIVERABLE_QUEUE, all_queues, exchange_for, queue_arguments
from hub.settings import Settings


def connect(connection: Connection) -> None:
    """Connect once to each node the URL lists, in turn, until one answers.

    kombu's failover moves to the next node only between retries, and the
    hub's threads keep their own retry cadence (`broker_retry_interval_s`):
    one attempt per listed node, no sleep, then the last error is raised.
    A cluster's node that stopped refuses at once; the next one is tried.
    """
    nodes = max(1, len(connection.alt))
    connection.ensure_connection(
        max_retries=nodes - 1, interval_start=0, interval_step=0, interval_max=0
    )


def queue_depths(settings: Settings, timeout_s: float = 3.0) -> dict[str, int | None]:
    """Messages waiting in each hub queue; None for a queue that does not exist yet."""
    depths: dict[str, int | None] = {}
    names = all_queues()
    if settings.broker_queue_type == "quorum":
        names.append(UNDELIVERABLE_QUEUE)
    with Connection(settings.effective_broker_url, connect_timeout=timeout_s) as conn:
        connect(conn)
        for name in names:
            # A passive declare counts without creating; a missing queue closes
            # the channel, so each queue gets a fresh one.
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
                depths[name] = int(count)
            except conn.channel_errors:
                depths[name] = None
            finally:
                try:
                    channel.close()
                except conn.connection_errors + conn.channel_errors:
                    pass
    return depths


def celery_queues(settings: Settings) -> list[Queue]:
    """Durable queue declarations of every hub queue (`hub.routing`), of the type
    `broker_queue_type` says.

    Publishers declare them too: a confirm from RabbitMQ means "stored" only if
    a durable queue was there to take the message.
    """
    name, kind = exchange_for(settings.broker_queue_type)
    exchange = Exchange(name, type=kind, durable=True)
    arguments = queue_arguments(settings.broker_queue_type, settings.broker_delivery_limit)
    return [
        Queue(queue, exchange, routing_key=queue, durable=True, queue_arguments=arguments)
        for queue in all_queues()
    ]


def undeliverable_queue(settings: Settings) -> Queue | None:
    """The queue quorum queues dead-letter into (`hub.routing.UNDELIVERABLE_QUEUE`),
    bound to the default exchange only; None with classic queues."""
    if settings.broker_queue_type != "quorum":
        return None
    return Queue(
        UNDELIVERABLE_QUEUE,
        Exchange(""),
        routing_key=UNDELIVERABLE_QUEUE,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
