"""The Celery application object, its configuration and the worker's context.

Layer: tasks; imports the `hub` core and `localqueue` only.

What a task needs to know of its process (the settings, the worker's name)
is one frozen `WorkerContext`, built at import from the environment (as
`celery -A tasks worker` and `python -m tasks.worker` start) and replaced as a
whole, never edited: by `configure` in a process that builds its settings
otherwise, and once at worker start with the worker's node name. Tasks read it
with `context()`.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery
from celery.signals import worker_init
from kombu import Exchange, Queue

import localqueue  # noqa: F401  (registers the embedded default's queue with kombu)
from hub.routing import HANDLER_QUEUE, all_queues, exchange_for, queue_arguments, task_routes
from hub.settings import Settings, load_settings
from hub.storage import migrate
from tasks import wire

log = logging.getLogger(__name__)


def celery_queues(settings: Settings) -> list[Queue]:
    """Durable queue declarations of every hub queue (`hub.routing`), of the type
    `broker_queue_type` says, declared by the worker as by the publishers
    (`bridges.queues.celery_queues`)."""
    name, kind = exchange_for(settings.broker_queue_type)
    exchange = Exchange(name, type=kind, durable=True)
    arguments = queue_arguments(settings.broker_queue_type, settings.broker_delivery_limit)
    return [
        Queue(queue, exchange, routing_key=queue, durable=True, queue_arguments=arguments)
        for queue in all_queues()
    ]


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What this process's tasks run with."""

    settings: Settings
    #: This worker's node name (`celery@host`), under which it counts (hub.worker_metrics).
    name: str


_context = WorkerContext(settings=load_settings(), name=socket.gethostname())


def context() -> WorkerContext:
    """This process's worker context (settings and worker name)."""
    return _context


# Task bodies are decoded with a bounded depth, so that no message can make a
# prefork worker fail to pickle it and exit (tasks/wire.py).
wire.install()


def worker_name() -> str:
    """This worker's node name (`celery@host`), under which it counts (hub.worker_metrics)."""
    return _context.name


app = Celery(
    "tasks",
    include=["tasks.ingest", "tasks.commands", "tasks.handlers", "tasks.counting", "tasks.upkeep"],
)
app.conf.update(
    # Results live in the database so any process can read them (not rpc://).
    result_extended=True,
    database_create_tables_at_setup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_routes=task_routes(),
    task_default_queue=HANDLER_QUEUE,
    task_default_routing_key=HANDLER_QUEUE,
    # At least once: a message is acknowledged to RabbitMQ after its task ran,
    # and requeued if the worker dies in the middle. Tasks are idempotent.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Per consumer, not per channel, on quorum queues: they have no global QoS,
    # which Celery detects (worker_detect_quorum_queues, on by default).
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    enable_utc=True,
    # Records task messages that cannot be decoded as dead letters (tasks/consumer.py).
    worker_consumer="tasks.consumer:HubConsumer",
)


def configure(new_settings: Settings) -> None:
    """Point the app (broker, result backend, database) at these settings.

    Workers take the settings from the environment at import; a process that
    builds its settings otherwise (the `hub` command, tests) calls this before
    it sends anything.
    """
    global _context
    _context = replace(_context, settings=new_settings)
    exchange, exchange_type = exchange_for(new_settings.broker_queue_type)
    app.conf.update(
        broker_url=new_settings.effective_broker_url,
        result_backend=new_settings.effective_result_backend,
        broker_transport_options=_transport_options(new_settings.effective_broker_url),
        task_queues=celery_queues(new_settings),
        task_default_exchange=exchange,
        task_default_exchange_type=exchange_type,
        # With several nodes in broker_url: the next one after a failure, in turn.
        broker_failover_strategy="round-robin",
        # Queues a worker is told of (-Q) that are not declared: of our type.
        task_create_missing_queue_type=new_settings.broker_queue_type,
    )
    # Celery caches the queues (and what it derived from them) on first use;
    # a process configured again must not keep the old type's declarations.
    for derived in ("queues", "router", "default_queue"):
        app.amqp.__dict__.pop(derived, None)
    # Its connection pools too (as Celery resets them after a fork): kept, they
    # would go on publishing to the old broker_url (another vhost, node or type).
    app._pool = None
    app.amqp._producer_pool = None


def _transport_options(broker_url: str) -> dict[str, Any]:
    """Publisher confirms on RabbitMQ for what tasks publish (handler runs, retries,
    commands): a publish returns once RabbitMQ has the message on disk, so a broker
    killed right after cannot lose a handler run whose batch is then acknowledged.
    (The local queue commits a task's publishes with its acknowledgement instead.)"""
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return {"confirm_publish": True}
    return {}


configure(_context.settings)


@worker_init.connect
def _migrate_on_start(**_: Any) -> None:
    """Bring the database schema up to date before the first task runs.

    The hub and other workers may be migrating the same database right now:
    `migrate` waits for them (hub/storage.py), then finds nothing left to do.
    """
    migrate(_context.settings.effective_database_url)


@worker_init.connect
def _name_worker(sender: Any = None, **_: Any) -> None:
    global _context
    # Celery's WorkController is untyped; its node name is known only at start.
    hostname = getattr(sender, "hostname", None)
    if isinstance(hostname, str) and hostname:
        _context = replace(_context, name=hostname)
