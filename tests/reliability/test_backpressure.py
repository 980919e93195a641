"""The dispatcher's bound under a flood, on a private RabbitMQ node: with RabbitMQ
away and the spool full, a QoS 0 flood (never acknowledged, so no window of the
device's own holds it back) is held at `dispatch_max_pending_messages` by not
reading the device any more, and once RabbitMQ is back every message of the
flood is stored, and the other devices lose nothing (docs/delivery.md,
"Bounds and backpressure")."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text

from hub.storage import make_engine
from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubProcess,
    RabbitNode,
    WorkerProcess,
    assert_nothing_lost,
    conclude,
    measure_recovery,
    provision,
    wait_for,
)
from tests.support.raw_mqtt import RawMqttDevice

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

MAX_PENDING = 600
SPOOL_MAX = 300
FLOOD = 4_000
#: Each message carries this much, so that the flood (20 MB) is far more than
#: the sockets' buffers between the device and the hub hold.
PAD = "x" * 5000
#: Envelopes that may come on top of the bound: each TCP device's frame read
#: before its connection paused, and presence records, which are not refused.
SLACK = 50


def _stored(database_url: str, device_id: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(DISTINCT seq) FROM telemetry WHERE device_id = :d"),
                    {"d": device_id},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_qos0_flood_with_rabbitmq_away_is_held_at_the_bound_then_stored_in_full(
    rabbit_node: RabbitNode,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    tcp_ids = [f"rel-bound-tcp-{n}" for n in (1, 2)]
    mqtt_ids = [f"rel-bound-mqtt-{n}" for n in (1, 2)]
    flooder = "rel-bound-flood"
    credentials = provision(database_url, [*tcp_ids, *mqtt_ids, flooder])
    workers(rabbit_node.url, database_url, concurrency=1)
    hub = hubs(
        database_url,
        broker_url=rabbit_node.url,
        env={
            "HUB_BROKER_CONFIRM_TIMEOUT_S": "3",
            "HUB_SPOOL_MAX_MESSAGES": str(SPOOL_MAX),
            "HUB_BATCH_MAX_MESSAGES": "50",
            "HUB_DISPATCH_MAX_PENDING_MESSAGES": str(MAX_PENDING),
        },
    )
    fleet = fleets(
        FleetOptions(
            tcp_port=hub.options.tcp_port,
            mqtt_port=hub.options.mqtt_port,
            tcp={d: credentials[d] for d in tcp_ids},
            mqtt={d: credentials[d] for d in mqtt_ids},
        )
    )
    assert fleet.wait_acks(100, 90), "the fleet was not acknowledged before the fault"
    rabbit_node.stop()
    assert wait_for(lambda: hub.metric("hub_spool_messages") >= SPOOL_MAX * 0.8, 90)

    device = RawMqttDevice(hub.options.mqtt_port, flooder, credentials[flooder], timeout=300)
    sent = 0
    failure: list[BaseException] = []

    def flood() -> None:
        nonlocal sent
        try:
            for seq in range(1, FLOOD + 1):
                payload = json.dumps(
                    {"seq": seq, "boot": 1, "values": {"n": seq, "pad": PAD}}
                ).encode()
                device.publish_qos0(f"devices/{flooder}/telemetry", payload)
                sent = seq
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    try:
        assert wait_for(lambda: hub.metric("hub_dispatch_full_total") >= 1, 60), (
            "the dispatcher never filled"
        )
        # Held: the hub stops reading, so the flood stalls in the sockets' buffers.
        highest = 0.0
        for _ in range(20):
            highest = max(highest, hub.metric("hub_dispatch_pending"))
            time.sleep(0.25)
        stalled_at = sent
        time.sleep(2)
        assert flooding.is_alive() and sent == stalled_at < FLOOD, (sent, failure)
        assert highest <= MAX_PENDING + SLACK, highest

        rabbit_node.start()
        lifted = time.monotonic()
        flooding.join(timeout=240)
        assert not flooding.is_alive() and not failure, (sent, failure)
        assert sent == FLOOD
        # Every QoS 0 message of the flood stored: held back, never dropped.
        assert wait_for(lambda: _stored(database_url, flooder) == FLOOD, 240), _stored(
            database_url, flooder
        )
    finally:
        device.close()
    recovery = measure_recovery(fleet, database_url, lifted)
    assert wait_for(lambda: hub.metric("hub_spool_messages") == 0, 120)
    results = conclude(
        "QoS 0 flood, RabbitMQ away, dispatcher bound", fleet, database_url, recovery_s=recovery
    )
    assert_nothing_lost(results, ("tcp", "mqtt"))
