"""Poison input: deeply nested, oversized and pathological payloads from bad devices,
mixed with healthy devices' traffic, on both transports.

In RabbitMQ mode (a real prefork worker with two pool processes) and in the
embedded default (the in-hub worker). Every healthy acknowledged message is
stored, once; the workers keep the same processes (no crash, no restart);
every bad payload is refused (NAK BAD_PAYLOAD or TOO_LARGE on TCP, an
invalid payload on MQTT) and counted in `/metrics`, and none is logged as a
bridge failure.
"""

from __future__ import annotations

import struct
import urllib.request
import zlib
from collections.abc import Callable

import pytest

from hub.protocol.events import Ack, Nak, NakReason
from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubProcess,
    WorkerProcess,
    assert_nothing_lost,
    conclude,
    provision,
    read_stored,
)
from tests.support.raw_device import RawDevice
from tests.support.raw_mqtt import RawMqttDevice

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

DEVICES_PER_TRANSPORT = 3
ROUNDS = 3


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


#: What a bad device sends as its JSON, and why it is bad.
POISON: dict[str, bytes] = {
    "deep-40": nested(40),
    "deep-500": nested(500),
    "deep-975": nested(975),
    "deep-5000": nested(5000),
    "arrays-20000": b'{"a":' + b"[" * 20000 + b"]" * 20000 + b"}",
    "int-5000-digits": b'{"a":' + b"7" * 5000 + b"}",
    "float-1e999": b'{"a":1e999}',
    "nan": b'{"a":NaN}',
    "infinity": b'{"a":-Infinity}',
}
#: Larger than `max_payload_bytes` (MQTT) and than `max_frame_bytes` (TCP).
OVERSIZED = b'{"a":"' + b"x" * 70_000 + b'"}'


# -- a bad TCP device: one connection per poison frame (the hub closes it after the NAK) --


def tcp_frame(seq: int, json_body: bytes) -> bytes:
    """A TELEMETRY frame laid out by hand (docs/protocol.md), whatever its JSON."""
    payload = b"\x00" * 8 + json_body
    body = struct.pack(">2sBBBII", b"HB", 1, 0x02, 0, len(payload), seq) + payload
    return body + struct.pack(">I", zlib.crc32(body))


def poison_tcp(port: int, device_id: str, credential: str) -> dict[str, object]:
    """Send every poison payload once; returns what the hub answered to each."""
    answers: dict[str, object] = {}
    for seq, (name, body) in enumerate([*POISON.items(), ("oversized", OVERSIZED)], start=1):
        device = RawDevice(port, timeout=30)
        try:
            assert device.hello(device_id, credential) == Ack(0)
            device.send_raw(tcp_frame(seq, body))
            answers[name] = device.next_event(timeout=30)
        finally:
            device.close()
    return answers


# -- a bad MQTT device: plain MQTT 3.1.1 on a socket, QoS 1 ---------------------------


def poison_mqtt(port: int, device_id: str, credential: str, root: str = "devices") -> int:
    """Publish every poison payload at QoS 1 on one connection; returns how many were PUBACKed."""
    device = RawMqttDevice(port, device_id, credential)
    try:
        for payload in [*POISON.values(), OVERSIZED]:
            device.publish_qos1(f"{root}/{device_id}/telemetry", payload)
    finally:
        device.close()
    return len(POISON) + 1


def metric(hub: HubProcess, name: str) -> float:
    url = f"http://127.0.0.1:{hub.options.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.parametrize("mode", ["rabbitmq", "embedded"])
def test_poison_input_mixed_with_healthy_traffic(
    mode: str,
    shared_rabbit_url: str,
    database_url: str,
    hubs: Callable[..., HubProcess],
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    name = f"poison-{mode}"
    tcp_ids = [f"rel-{name}-tcp-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    mqtt_ids = [f"rel-{name}-mqtt-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    bad_tcp, bad_mqtt = f"rel-{name}-bad-tcp", f"rel-{name}-bad-mqtt"
    credentials = provision(database_url, [*tcp_ids, *mqtt_ids, bad_tcp, bad_mqtt])
    broker_url = shared_rabbit_url if mode == "rabbitmq" else None
    worker = workers(broker_url, database_url, concurrency=2) if broker_url else None
    hub = hubs(database_url, broker_url=broker_url)
    worker_pids = (
        {worker.process.pid, *_children(worker.process.pid)} if worker else set(hub.children())
    )
    assert worker_pids, "no worker process to watch"

    fleet = fleets(
        FleetOptions(
            tcp_port=hub.options.tcp_port,
            mqtt_port=hub.options.mqtt_port,
            tcp={d: credentials[d] for d in tcp_ids},
            mqtt={d: credentials[d] for d in mqtt_ids},
        )
    )
    assert fleet.wait_acks(100, 90), "the healthy fleet was not acknowledged before the poison"

    for _ in range(ROUNDS):
        answers = poison_tcp(hub.options.tcp_port, bad_tcp, credentials[bad_tcp])
        for poison_name, answer in answers.items():
            expected = NakReason.TOO_LARGE if poison_name == "oversized" else NakReason.BAD_PAYLOAD
            assert isinstance(answer, Nak) and answer.reason == expected, (poison_name, answer)
        assert (
            poison_mqtt(hub.options.mqtt_port, bad_mqtt, credentials[bad_mqtt]) == len(POISON) + 1
        )
        # Healthy devices keep being acknowledged between rounds.
        assert fleet.wait_acks(50, 60), "healthy devices stopped being acknowledged"

    assert fleet.wait_acks(100, 60)
    results = conclude(f"poison input ({mode})", fleet, database_url, recovery_s=None)
    assert_nothing_lost(results, ("tcp", "mqtt"))

    # No bad message was acknowledged as data: nothing of the bad devices is stored.
    assert read_stored(database_url, [bad_tcp, bad_mqtt]).telemetry == {}
    # The same worker processes, none restarted.
    now = {worker.process.pid, *_children(worker.process.pid)} if worker else set(hub.children())
    assert now == worker_pids, f"worker processes changed: {worker_pids} -> {now}"
    log = hub.log_text() + (worker.log_path.read_text(errors="replace") if worker else "")
    data_log = hub.options.data_dir / "worker.log"
    if data_log.exists():
        log += data_log.read_text(errors="replace")
    for sign in ("Unrecoverable error", "RecursionError", "restarting it", "bridge failed"):
        assert sign not in log, f"{sign!r} in the logs"
    # Every bad payload counted: MQTT as invalid payloads, TCP as protocol errors.
    assert metric(hub, 'hub_invalid_payloads_total{transport="mqtt"}') >= ROUNDS * (len(POISON) + 1)
    assert metric(hub, 'hub_protocol_errors_total{reason="bad_payload",transport="tcp"}') >= (
        ROUNDS * len(POISON)
    )
    assert metric(hub, 'hub_protocol_errors_total{reason="too_large",transport="tcp"}') >= ROUNDS


def _children(pid: int) -> set[int]:
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()
