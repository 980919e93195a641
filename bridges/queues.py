"""The hub's queues on the task broker: their declarations for the dispatcher,
their depths for `hub status`.

Layer: bridges; imports the `hub` core only.
"""

from __future__ import annotations

from kombu import Connection, Exchange, Queue

from hub.routing import EXCHANGE, all_queues


def queue_depths(broker_url: str, timeout_s: float = 3.0) -> dict[str, int | None]:
    """Messages waiting in each hub queue; None for a queue that does not exist yet."""
    depths: dict[str, int | None] = {}
    with Connection(broker_url, connect_timeout=timeout_s) as conn:
        conn.ensure_connection(max_retries=0)
        for name in all_queues():
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


def celery_queues() -> list[Queue]:
    """Durable queue declarations of every hub queue (`hub.routing`).

    Publishers declare them too: a confirm from RabbitMQ means "stored" only if
    a durable queue was there to take the message.
    """
    exchange = Exchange(EXCHANGE, type="direct", durable=True)
    return [Queue(name, exchange, routing_key=name, durable=True) for name in all_queues()]
