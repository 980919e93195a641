"""The queue declarations of each `broker_queue_type`, for publishers and workers alike.

Layer: tests (unit; pure code, no broker).
"""

from __future__ import annotations

from bridges.queues import celery_queues as publisher_queues
from bridges.queues import undeliverable_queue
from hub.routing import UNDELIVERABLE_QUEUE, all_queues
from hub.settings import load_settings
from tasks.application import celery_queues as worker_queues

RABBIT = "amqp://guest:guest@127.0.0.1:5672//"


def _shape(queues: list) -> list[tuple[str, str, str, dict | None]]:  # type: ignore[type-arg]
    return [(q.name, q.exchange.name, q.exchange.type, q.queue_arguments) for q in queues]


def test_classic_is_the_direct_exchange_without_arguments() -> None:
    settings = load_settings(broker_url=RABBIT)
    shape = _shape(publisher_queues(settings))
    assert [s[0] for s in shape] == all_queues()
    assert {s[1:] for s in shape} == {("hub", "direct", None)}
    assert undeliverable_queue(settings) is None


def test_quorum_queues_dead_letter_past_the_delivery_limit() -> None:
    settings = load_settings(broker_url=RABBIT, broker_queue_type="quorum", broker_delivery_limit=7)
    for _, exchange, kind, arguments in _shape(publisher_queues(settings)):
        # A topic exchange, for Celery's native delayed delivery of the expiry countdown.
        assert (exchange, kind) == ("hub.quorum", "topic")
        assert arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 7,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": UNDELIVERABLE_QUEUE,
        }
    undeliverable = undeliverable_queue(settings)
    assert undeliverable is not None and undeliverable.name == UNDELIVERABLE_QUEUE


def test_publishers_and_workers_declare_the_same_queues() -> None:
    for queue_type in ("classic", "quorum"):
        settings = load_settings(broker_url=RABBIT, broker_queue_type=queue_type)
        assert _shape(publisher_queues(settings)) == _shape(worker_queues(settings))
