"""Broker faults under load, on a private RabbitMQ node (never the shared one):
hung (SIGSTOP, no RST), stopped and restarted, SIGKILLed and started, and away
long enough for the spool to fill.

Each scenario streams from TCP (native) and MQTT (QoS 1) devices at once, ends
with `compare()` (lost 0, duplicates 0) and records its figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubProcess,
    RabbitNode,
    WorkerProcess,
    assert_nothing_lost,
    conclude,
    in_order,
    measure_recovery,
    provision,
    read_stored,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

DEVICES_PER_TRANSPORT = 3
CONFIRM_TIMEOUT_S = 3.0
HUNG_FOR_S = 45.0


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


def _broker_env(**more: str) -> dict[str, str]:
    return {
        "HUB_BROKER_CONFIRM_TIMEOUT_S": str(CONFIRM_TIMEOUT_S),
        "HUB_BROKER_HEARTBEAT_S": "10",
        **more,
    }


def _start(
    rabbit_node: RabbitNode,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    *,
    concurrency: int = 2,
    **env: str,
) -> HubProcess:
    provision(database_url, [])
    workers(rabbit_node.url, database_url, concurrency=concurrency)
    return hubs(database_url, broker_url=rabbit_node.url, env=_broker_env(**env))


def test_hung_rabbitmq_spools_within_the_confirm_timeout_then_drains(
    rabbit_node: RabbitNode,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    hub = _start(rabbit_node, database_url, hubs, workers)
    fleet = _fleet_for(hub, database_url, "hung", fleets)
    assert fleet.wait_acks(200, 90), "the fleet was not acknowledged before the fault"
    rabbit_node.sigstop()
    frozen_at = time.monotonic()
    time.sleep(HUNG_FOR_S)
    thawed_at = time.monotonic()
    # Give the hub the confirm timeout and a generous margin, then expect the
    # spool to carry the acknowledgements for the rest of the freeze.
    during = fleet.acks_between(frozen_at + CONFIRM_TIMEOUT_S + 10, thawed_at)
    spooled = hub.metric("hub_envelopes_spooled_total")
    rabbit_node.sigcont()
    lifted = time.monotonic()
    assert during > 100, (
        f"only {during} acknowledgements during a {HUNG_FOR_S:g} s hung RabbitMQ "
        f"({spooled:g} envelopes spooled)"
    )
    assert spooled > 0
    recovery = measure_recovery(fleet, database_url, lifted)
    # Sent through RabbitMQ again, not only from the spool.
    assert fleet.wait_acks(200, 90)
    assert wait_for(lambda: hub.metric("hub_spool_messages") == 0, 120)
    assert hub.metric("hub_broker_connected") == 1
    results = conclude("RabbitMQ hung 45 s (SIGSTOP)", fleet, database_url, recovery_s=recovery)
    assert_nothing_lost(results, ("tcp", "mqtt"))


@pytest.mark.parametrize("fault", ["stop", "sigkill"])
def test_rabbitmq_stopped_or_killed_mid_stream_the_hub_reconnects_by_itself(
    fault: str,
    rabbit_node: RabbitNode,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    hub = _start(rabbit_node, database_url, hubs, workers)
    fleet = _fleet_for(hub, database_url, f"rmq{fault}", fleets)
    assert fleet.wait_acks(200, 90), "the fleet was not acknowledged before the fault"
    if fault == "stop":
        rabbit_node.stop()
    else:
        rabbit_node.sigkill()
    # Acknowledged from the spool while RabbitMQ is away.
    assert fleet.wait_acks(200, 60), "acknowledgements stopped while RabbitMQ was away"
    assert hub.metric("hub_envelopes_spooled_total") > 0
    time.sleep(5)
    rabbit_node.start()
    lifted = time.monotonic()
    recovery = measure_recovery(fleet, database_url, lifted)
    assert wait_for(lambda: hub.metric("hub_broker_connected") == 1, 60)
    assert wait_for(lambda: hub.metric("hub_spool_messages") == 0, 120)
    assert fleet.wait_acks(200, 90)
    label = "RabbitMQ stopped, started" if fault == "stop" else "RabbitMQ SIGKILL, started"
    results = conclude(label, fleet, database_url, recovery_s=recovery)
    assert_nothing_lost(results, ("tcp", "mqtt"))


def test_spool_overflow_stops_acknowledging_then_drains_in_order(
    rabbit_node: RabbitNode,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    spool_max = 400
    # One worker process: storage order then follows queue order.
    hub = _start(
        rabbit_node,
        database_url,
        hubs,
        workers,
        concurrency=1,
        HUB_SPOOL_MAX_MESSAGES=str(spool_max),
    )
    fleet = _fleet_for(hub, database_url, "overflow", fleets)
    assert fleet.wait_acks(200, 90), "the fleet was not acknowledged before the fault"
    rabbit_node.stop()
    # The spool fills, then backpressure: no acknowledgement for a while.
    assert wait_for(lambda: hub.metric("hub_spool_messages") >= spool_max * 0.8, 90)
    assert wait_for(lambda: time.monotonic() - fleet.last_ack_at() > 8, 90), (
        "devices were still acknowledged with the spool full"
    )
    stalled = fleet.outstanding()
    assert stalled > 0
    rabbit_node.start()
    lifted = time.monotonic()
    recovery = measure_recovery(fleet, database_url, lifted)
    assert wait_for(lambda: hub.metric("hub_spool_messages") == 0, 120)
    assert fleet.wait_acks(200, 90)
    results = conclude("spool overflow", fleet, database_url, recovery_s=recovery)
    assert_nothing_lost(results, ("tcp", "mqtt"))
    acked = fleet.snapshot()
    assert in_order(read_stored(database_url, acked), acked) == []
