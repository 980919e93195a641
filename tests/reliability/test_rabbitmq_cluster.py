"""A three-node RabbitMQ cluster with quorum queues, under load: the node the hub
is connected to is stopped, brought back, then another is stopped.

Three private nodes (own names, ports, folders and Erlang cookie; never the
machine's RabbitMQ) are joined into one cluster. The hub and a worker get every
node in `broker_url` (`amqp://c1;amqp://c2;amqp://c3`) and
`broker_queue_type = quorum`. TCP (native) and MQTT (QoS 1) devices stream
throughout. Each stopped node must be left by the hub (its publisher) and the
worker by themselves, the devices must go on being acknowledged, and at the end
every acknowledged message is stored exactly once (`compare()`: lost 0,
duplicates 0, every handler run once). See docs/scaling.md, "A RabbitMQ cluster".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubProcess,
    RabbitCluster,
    RabbitNode,
    WorkerProcess,
    assert_nothing_lost,
    conclude,
    measure_recovery,
    provision,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

DEVICES_PER_TRANSPORT = 3
CONFIRM_TIMEOUT_S = 3.0
QUORUM = {"HUB_BROKER_QUEUE_TYPE": "quorum"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    """A started three-node cluster, every node stopped after the test."""
    nodes = RabbitCluster(tmp_path / "cluster")
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


def _hub_node(cluster: RabbitCluster, hub: HubProcess) -> RabbitNode:
    """The node the hub's publisher (and downlink) is connected to now."""
    assert hub.process is not None
    pid = hub.process.pid
    assert wait_for(lambda: bool(cluster.connected_nodes(pid)), 30), (
        "the hub holds no connection to any node of the cluster"
    )
    return cluster.connected_nodes(pid)[0]


def _stop_under_load(
    cluster: RabbitCluster,
    node: RabbitNode,
    hub: HubProcess,
    worker: WorkerProcess,
    fleet: Fleet,
    database_url: str,
) -> float:
    """Stop `node` mid-stream; the seconds until acknowledgements flow again and
    everything acknowledged so far is stored (through the other nodes)."""
    others = [n for n in cluster.nodes if n is not node]
    node.stop()
    stopped = time.monotonic()
    recovery = measure_recovery(fleet, database_url, stopped)
    # Acknowledged after the stop, not only from the spool: RabbitMQ took them.
    assert fleet.wait_acks(200, 90), f"acknowledgements stopped with {node.name} down"
    assert wait_for(lambda: hub.metric("hub_broker_connected") == 1, 60), (
        f"the hub did not reconnect to another node after {node.name} stopped"
    )
    assert wait_for(lambda: hub.metric("hub_spool_messages") == 0, 120)
    assert hub.process is not None
    pid = hub.process.pid
    assert wait_for(
        lambda: bool(held := cluster.connected_nodes(pid)) and all(n in others for n in held),
        60,
    ), "the hub is not connected to a live node"
    assert wait_for(lambda: bool(cluster.connected_nodes(worker.process.pid)), 60), (
        "the worker did not reconnect to a live node"
    )
    return recovery


def test_cluster_node_of_the_hub_stopped_then_another_nothing_acknowledged_lost(
    cluster: RabbitCluster,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    provision(database_url, [])
    worker = workers(
        cluster.url, database_url, concurrency=2, settings={"broker_queue_type": "quorum"}
    )
    hub = hubs(
        database_url,
        broker_url=cluster.url,
        env={
            **QUORUM,
            "HUB_BROKER_CONFIRM_TIMEOUT_S": str(CONFIRM_TIMEOUT_S),
            "HUB_BROKER_HEARTBEAT_S": "10",
        },
    )
    leaders = cluster.quorum_leaders()
    assert {"hub.telemetry", "hub.handlers"} <= set(leaders), (
        f"the hub's queues are not quorum queues: {leaders}"
    )
    tcp_ids = [f"rel-cluster-tcp-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    mqtt_ids = [f"rel-cluster-mqtt-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    credentials = provision(database_url, tcp_ids + mqtt_ids)
    fleet = fleets(
        FleetOptions(
            tcp_port=hub.options.tcp_port,
            mqtt_port=hub.options.mqtt_port,
            tcp={d: credentials[d] for d in tcp_ids},
            mqtt={d: credentials[d] for d in mqtt_ids},
        )
    )
    assert fleet.wait_acks(200, 90), "the fleet was not acknowledged before the fault"

    first = _hub_node(cluster, hub)
    recoveries = [_stop_under_load(cluster, first, hub, worker, fleet, database_url)]

    first.start()
    assert wait_for(cluster.all_running, 120), f"{first.name} did not rejoin the cluster"
    assert fleet.wait_acks(200, 90)

    second = _hub_node(cluster, hub)
    assert second is not first
    recoveries.append(_stop_under_load(cluster, second, hub, worker, fleet, database_url))

    results = conclude(
        "RabbitMQ cluster, quorum queues: hub's node stopped, back, another stopped",
        fleet,
        database_url,
        recovery_s=max(recoveries),
    )
    print(f"recovery after each stop: {[round(r, 1) for r in recoveries]} s")
    assert_nothing_lost(results, ("tcp", "mqtt"))
