"""Process faults under load: a worker SIGKILLed mid-stream, a hub SIGKILLed mid-stream
(RabbitMQ mode and the embedded default) and restarted on the same data folder.

Each scenario streams from TCP (native) and MQTT (QoS 1) devices at once, ends
with `compare()` (lost 0, duplicates 0) and records its figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import pytest

from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubProcess,
    WorkerProcess,
    assert_nothing_lost,
    conclude,
    measure_recovery,
    provision,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

DEVICES_PER_TRANSPORT = 3


def _fleet_for(
    hub: HubProcess, database_url: str, name: str, fleets: Callable[[FleetOptions], Fleet]
) -> Fleet:
    tcp_ids = [f"rel-{name}-tcp-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    mqtt_ids = [f"rel-{name}-mqtt-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    credentials = provision(database_url, tcp_ids + mqtt_ids)
    return fleets(
        FleetOptions(
            tcp_port=hub.options.tcp_port,
            mqtt_port=hub.options.mqtt_port,
            tcp={d: credentials[d] for d in tcp_ids},
            mqtt={d: credentials[d] for d in mqtt_ids},
        )
    )


def test_worker_sigkill_mid_stream_then_a_new_worker(
    shared_rabbit_url: str,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    provision(database_url, [])
    first = workers(shared_rabbit_url, database_url, concurrency=2)
    hub = hubs(database_url, broker_url=shared_rabbit_url)
    fleet = _fleet_for(hub, database_url, "wkill", fleets)
    assert fleet.wait_acks(300, 90), "the fleet was not acknowledged before the fault"
    first.kill()
    # The hub keeps acknowledging: RabbitMQ holds the messages while no worker runs.
    assert fleet.wait_acks(200, 60), "acknowledgements stopped while no worker ran"
    workers(shared_rabbit_url, database_url, concurrency=2)
    lifted = time.monotonic()
    recovery = measure_recovery(fleet, database_url, lifted)
    fleet.wait_acks(200, 60)
    results = conclude("worker SIGKILL (RabbitMQ)", fleet, database_url, recovery_s=recovery)
    assert_nothing_lost(results, ("tcp", "mqtt"))


@pytest.mark.parametrize("mode", ["rabbitmq", "embedded"])
def test_hub_sigkill_mid_stream_then_restart_on_the_same_data_folder(
    mode: str,
    shared_rabbit_url: str,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    provision(database_url, [])
    broker_url = shared_rabbit_url if mode == "rabbitmq" else None
    if broker_url:
        workers(broker_url, database_url, concurrency=2)
    hub = hubs(database_url, broker_url=broker_url)
    fleet = _fleet_for(hub, database_url, f"hkill-{mode}", fleets)
    assert fleet.wait_acks(300, 90), "the fleet was not acknowledged before the fault"
    children = hub.children()
    if mode == "embedded":
        assert children, "the embedded default runs no worker child"
    hub.kill()
    # The embedded worker child must die with the hub, not linger on the queue.
    assert wait_for(lambda: not any(_alive(pid) for pid in children), 60), (
        f"the hub's children outlived it: {[p for p in children if _alive(p)]}"
    )
    time.sleep(2)  # devices notice, back off and retry against a closed port
    hub.start()
    lifted = time.monotonic()
    recovery = measure_recovery(fleet, database_url, lifted)
    fleet.wait_acks(200, 60)
    label = "hub SIGKILL (RabbitMQ)" if mode == "rabbitmq" else "hub SIGKILL (embedded default)"
    results = conclude(label, fleet, database_url, recovery_s=recovery)
    assert_nothing_lost(results, ("tcp", "mqtt"))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
