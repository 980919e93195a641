"""Quorum queues on one RabbitMQ node (a fresh vhost of the shared one): the whole
pipeline with `broker_queue_type = quorum`, the command expiry's countdown through
Celery's native delayed delivery, and a hub refusing queues of the other type.
The cluster and its failover are tests/reliability/test_rabbitmq_cluster.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import Engine, func, select

import tasks
import tasks.application
from bridges.publisher import check_broker
from hub.errors import CommandExpired, ConfigError
from hub.settings import Settings
from hub.storage import TelemetryRow
from tests.support.processes import HubThread, SimulatedDevice, Worker, wait_until
from tests.support.services import amqp_url, create_vhost, delete_vhost

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh_vhost_url() -> Iterator[str]:
    vhost = create_vhost()
    try:
        yield amqp_url(vhost)
    finally:
        delete_vhost(vhost)


def test_a_hub_refuses_queues_of_the_other_type(
    fresh_vhost_url: str, hub_settings_factory: Callable[..., Settings]
) -> None:
    check_broker(hub_settings_factory(broker_url=fresh_vhost_url))  # declares classic queues

    with pytest.raises(ConfigError, match="broker_queue_type") as caught:
        check_broker(hub_settings_factory(broker_url=fresh_vhost_url, broker_queue_type="quorum"))
    assert caught.value.env == "HUB_BROKER_QUEUE_TYPE"


def test_the_pipeline_on_quorum_queues_stores_and_expires_commands(
    fresh_vhost_url: str,
    tmp_path: Path,
    engine: Engine,
    hub_settings_factory: Callable[..., Settings],
    provision: Callable[[list[str]], dict[str, str]],
    simulated_devices: Callable[..., SimulatedDevice],
    device_prefix: str,
) -> None:
    settings = hub_settings_factory(broker_url=fresh_vhost_url, broker_queue_type="quorum")
    worker = Worker(settings, tmp_path / "worker.log", concurrency=2)
    hub = HubThread(settings)
    previous = tasks.application.context().settings
    tasks.application.configure(settings)
    try:
        # They are quorum queues: declaring one as classic is refused.
        with Connection(fresh_vhost_url) as conn:
            channel = conn.channel()
            with pytest.raises(conn.channel_errors, match="PRECONDITION_FAILED"):
                channel.queue_declare("hub.telemetry", durable=True, passive=False)
            # The worker set up Celery's native delayed delivery (its first level).
            conn.channel().exchange_declare("celery_delayed_27", "topic", passive=True)

        ((device_id, credential),) = provision([f"{device_prefix}q"]).items()
        simulated_devices("tcp", hub.tcp_port, device_id, credential, messages=20, rate=50.0)

        def stored() -> int:
            with engine.connect() as conn:
                query = select(func.count()).where(TelemetryRow.device_id == device_id)
                return int(conn.execute(query).scalar_one())

        assert wait_until(lambda: stored() == 20, timeout=60)

        # No device answers: the expiry, a countdown, must still fire, also for
        # less than the one second native delayed delivery counts in.
        provision([f"{device_prefix}offline"])
        result: Any = tasks.send_command(f"{device_prefix}offline", "ping", ttl=0.5)
        with pytest.raises(CommandExpired):
            result.get(timeout=60)
    finally:
        tasks.application.configure(previous)
        hub.stop()
        worker.stop()
