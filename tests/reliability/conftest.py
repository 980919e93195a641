"""Fixtures of the reliability suite: every process a scenario starts is ended after it,
whether the test passed or not (finalizers), so no node, hub or worker is left behind."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubOptions,
    HubProcess,
    RabbitNode,
    WorkerOptions,
    WorkerProcess,
)
from tests.support.services import amqp_url, create_vhost, delete_vhost


@pytest.fixture
def rabbit_node(tmp_path: Path) -> Iterator[RabbitNode]:
    """A started private RabbitMQ node, stopped after the test whatever happened."""
    node = RabbitNode(tmp_path / "rabbit")
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def shared_rabbit_url() -> Iterator[str]:
    """A fresh vhost of the shared RabbitMQ (for faults that do not touch RabbitMQ itself)."""
    vhost = create_vhost()
    try:
        yield amqp_url(vhost)
    finally:
        delete_vhost(vhost)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.sqlite3'}"


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """`hubs(broker_url=..., **HubOptions fields)`: a started hub process."""
    started: list[HubProcess] = []

    def start(database_url: str, **options: Any) -> HubProcess:
        hub = HubProcess(
            HubOptions(
                data_dir=tmp_path / f"hub-{len(started)}",
                database_url=database_url,
                **options,
            )
        )
        started.append(hub)
        hub.start()
        return hub

    yield start
    for hub in started:
        hub.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """`workers(broker_url, database_url, **WorkerOptions fields)`: a ready worker."""
    started: list[WorkerProcess] = []

    def start(broker_url: str, database_url: str, **options: Any) -> WorkerProcess:
        name = f"worker-{len(started)}-{uuid.uuid4().hex[:6]}"
        worker = WorkerProcess(
            WorkerOptions(broker_url, database_url, tmp_path / name, **options),
            tmp_path / f"{name}.log",
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()
        worker.stop()


@pytest.fixture
def fleets() -> Iterator[Callable[[FleetOptions], Fleet]]:
    """`fleets(FleetOptions(...))`: a started fleet, stopped after the test."""
    started: list[Fleet] = []

    def start(options: FleetOptions) -> Fleet:
        fleet = Fleet(options)
        started.append(fleet)
        fleet.start()
        return fleet

    yield start
    for fleet in started:
        fleet.stop(timeout=90)
