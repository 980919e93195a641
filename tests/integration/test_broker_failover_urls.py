"""A `broker_url` that lists several nodes, the first of them down: the hub's
publisher and downlink threads and the worker go on to the next by themselves
(real RabbitMQ on a fresh vhost, a closed port before it, a real worker, a real
hub, a simulated device). The cluster itself is
tests/reliability/test_rabbitmq_cluster.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

import tasks
import tasks.application
from hub.settings import Settings
from hub.storage import TelemetryRow
from tests.support.processes import HubThread, SimulatedDevice, Worker, wait_until
from tests.support.services import amqp_url, create_vhost, delete_vhost, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh_vhost() -> Iterator[str]:
    vhost = create_vhost()
    try:
        yield vhost
    finally:
        delete_vhost(vhost)


def test_the_hub_and_the_worker_skip_a_listed_node_that_is_down(
    fresh_vhost: str,
    tmp_path: Path,
    engine: Engine,
    hub_settings_factory: Callable[..., Settings],
    provision: Callable[[list[str]], dict[str, str]],
    simulated_devices: Callable[..., SimulatedDevice],
    device_prefix: str,
) -> None:
    down = amqp_url(fresh_vhost, port=free_port())  # nothing listens there
    settings = hub_settings_factory(broker_url=f"{down};{amqp_url(fresh_vhost)}")
    worker = Worker(settings, tmp_path / "worker.log", concurrency=1)
    hub = HubThread(settings)
    previous = tasks.application.context().settings
    tasks.application.configure(settings)
    try:
        ((device_id, credential),) = provision([f"{device_prefix}f"]).items()
        simulated_devices("tcp", hub.tcp_port, device_id, credential, messages=20, rate=50.0)

        def stored() -> int:
            with engine.connect() as conn:
                query = select(func.count()).where(TelemetryRow.device_id == device_id)
                return int(conn.execute(query).scalar_one())

        assert wait_until(lambda: stored() == 20, timeout=60)
        # Published through RabbitMQ, not only spooled.
        assert hub.counter("hub_envelopes_published_total") >= 20
        assert hub.counter("hub_broker_connected") == 1
        # The downlink consumer is on the live node too: a command round trip.
        reply = tasks.send_command(device_id, "ping", ttl=30).get(timeout=30)
        assert reply["pong"] is True
    finally:
        tasks.application.configure(previous)
        hub.stop()
        worker.stop()
