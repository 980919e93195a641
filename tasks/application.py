"""The Celery application object and its configuration.

Layer: tasks; imports the `hub` core only.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Celery
from celery.signals import task_failure, task_retry, worker_init, worker_process_init, worker_ready

import localqueue  # noqa: F401  (registers the embedded default's queue with kombu)
from hub import worker_metrics
from hub.routing import celery_queues, task_routes
from hub.settings import Settings, load_settings
from hub.storage import migrate
from tasks import wire

log = logging.getLogger(__name__)

settings: Settings = load_settings()

# Task bodies are decoded with a bounded depth, so that no message can make a
# prefork worker fail to pickle it and exit (tasks/wire.py).
wire.install()

_worker_name = socket.gethostname()


def worker_name() -> str:
    """This worker's node name (`celery@host`), under which it counts (hub.worker_metrics)."""
    return _worker_name


app = Celery("tasks", include=["tasks.ingest", "tasks.commands", "tasks.handlers"])
app.conf.update(
    # Results live in the database so any process can read them (not rpc://).
    result_extended=True,
    database_create_tables_at_setup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_queues=celery_queues(),
    task_routes=task_routes(),
    task_default_queue="hub.handlers",
    task_default_exchange="hub",
    task_default_routing_key="hub.handlers",
    # At least once: a message is acknowledged to RabbitMQ after its task ran,
    # and requeued if the worker dies in the middle. Tasks are idempotent.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
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
    global settings
    settings = new_settings
    app.conf.update(
        broker_url=settings.effective_broker_url,
        result_backend=settings.effective_result_backend,
    )


configure(settings)


@worker_init.connect
def _migrate_on_start(**_: Any) -> None:
    """Bring the database schema up to date before the first task runs.

    The hub and other workers may be migrating the same database right now:
    `migrate` waits for them (hub/storage.py), then finds nothing left to do.
    """
    migrate(settings.effective_database_url)


def count_event(name: str) -> None:
    """Add one to this worker's counter `name` (hub.worker_metrics), best effort."""
    # Best effort: a counter must never fail a task or a worker's start.
    from tasks.db import engine  # tasks.db imports this module

    try:
        worker_metrics.add(engine(), _worker_name, {name: 1})
    except Exception:  # boundary: the database may be away; the task's own error says so
        log.debug("could not count %s", name, exc_info=True)


@worker_init.connect
def _name_worker(sender: Any = None, **_: Any) -> None:
    global _worker_name
    hostname = getattr(sender, "hostname", None)
    if isinstance(hostname, str) and hostname:
        _worker_name = hostname


@worker_ready.connect
def _count_start(**_: Any) -> None:
    count_event(worker_metrics.WORKER_STARTS)


@worker_process_init.connect
def _count_process_start(**_: Any) -> None:
    count_event(worker_metrics.POOL_PROCESS_STARTS)


@task_retry.connect
def _count_retry(**_: Any) -> None:
    count_event(worker_metrics.TASK_FAILURES)


@task_failure.connect
def _count_failure(**_: Any) -> None:
    count_event(worker_metrics.TASK_FAILURES)
