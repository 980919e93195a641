"""Fixtures shared by the tests.

Integration fixtures use real services: a RabbitMQ vhost of their own per test
run (deleted afterwards), real `celery -A tasks worker` processes, the real
hub on free ports of 127.0.0.1. A missing service fails the test, saying what
to start.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from hub.registry import Registry
from hub.settings import Settings
from hub.storage import make_engine, migrate
from tests.support.processes import HubThread, SimulatedDevice, Worker, make_test_settings
from tests.support.raw_device import RawDevice
from tests.support.services import amqp_url, create_vhost, delete_vhost


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    vhost = create_vhost()
    try:
        yield vhost
    finally:
        delete_vhost(vhost)


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_vhost: str) -> str:
    return amqp_url(rabbitmq_vhost)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def database_url(pipeline_dir: Path) -> str:
    """One database for the whole run; tests keep apart by device id prefixes."""
    url = f"sqlite:///{pipeline_dir / 'hub.sqlite3'}"
    migrate(url)
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def hub_settings_factory(
    tmp_path: Path, rabbitmq_url: str, database_url: str
) -> Callable[..., Settings]:
    counter = iter(range(1000))

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"broker_url": rabbitmq_url, "database_url": database_url}
        values.update(overrides)
        return make_test_settings(tmp_path / f"hub{next(counter)}", **values)

    return make


@pytest.fixture(scope="session")
def worker(rabbitmq_url: str, database_url: str, pipeline_dir: Path) -> Iterator[Worker]:
    """One real worker process for the run, consuming the run's vhost."""
    settings = make_test_settings(
        pipeline_dir / "worker",
        broker_url=rabbitmq_url,
        database_url=database_url,
        handlers=("tests.support.example_handlers",),
    )
    w = Worker(settings, pipeline_dir / "worker.log", concurrency=2)
    yield w
    w.stop()


@pytest.fixture
def running_hub(
    hub_settings_factory: Callable[..., Settings],
) -> Iterator[Callable[..., HubThread]]:
    """Start hubs (`running_hub(**setting_overrides)`); all are stopped after the test."""
    hubs: list[HubThread] = []

    def start(**overrides: Any) -> HubThread:
        hub = HubThread(hub_settings_factory(**overrides))
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


@pytest.fixture
def provision(engine: Engine) -> Callable[[list[str]], dict[str, str]]:
    registry = Registry(engine)

    def add(device_ids: list[str]) -> dict[str, str]:
        return {device_id: registry.add(device_id) for device_id in device_ids}

    return add


@pytest.fixture
def device_prefix(request: pytest.FixtureRequest) -> str:
    """A device id prefix unique to the test, to count only its own rows."""
    return f"t{uuid.uuid4().hex[:8]}-"


@pytest.fixture
def connect() -> Iterator[Callable[[int], RawDevice]]:
    """Open hand-driven device connections to a hub port; all are closed after the test."""
    opened: list[RawDevice] = []

    def open_device(port: int) -> RawDevice:
        device = RawDevice(port)
        opened.append(device)
        return device

    yield open_device
    for device in opened:
        device.close()


@pytest.fixture
def simulated_devices() -> Iterator[Callable[..., SimulatedDevice]]:
    """Start long-lived simulated devices (`start(transport, port, id, credential)`)."""
    started: list[SimulatedDevice] = []

    def start(
        transport: str, port: int, device_id: str, credential: str, **options: Any
    ) -> SimulatedDevice:
        device = SimulatedDevice(transport, port, device_id, credential, **options)
        started.append(device)
        return device

    yield start
    for device in started:
        device.stop()


@pytest.fixture
def command_api(hub_settings_factory: Callable[..., Settings]) -> Iterator[Any]:
    """The `tasks` API (send_command, AsyncResult) pointed at this run's broker and database."""
    import tasks.application

    previous = tasks.application.context().settings
    tasks.application.configure(hub_settings_factory())
    yield tasks
    tasks.application.configure(previous)
