"""The legacy TCP path end to end: simulated devices, the hub, real RabbitMQ,
a real worker process, the real database."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from firmware_sim.faults import FlipByte, SplitRandomly
from firmware_sim.fleet import FleetOptions, FleetSummary, run_fleet
from hub.errors import ConfigError
from hub.protocol.events import Ack, ConnectionClosed, Nak, NakReason
from hub.storage import count_rows
from tests.support.processes import CuttableProxy, HubThread, Worker, wait_until
from tests.support.raw_device import RawDevice
from tests.support.services import RABBITMQ_HOST, RABBITMQ_PORT, amqp_url

Connect = Callable[[int], RawDevice]

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]


def _fleet(hub: HubThread, creds: dict[str, str], messages: int, **kw: Any) -> FleetSummary:
    options = FleetOptions(
        transport="tcp",
        host="127.0.0.1",
        port=hub.tcp_port,
        devices=list(creds.items()),
        messages=messages,
        **kw,
    )
    return asyncio.run(run_fleet(options))


def test_twenty_devices_two_hundred_messages_each_are_stored_once(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    creds = provision([f"{device_prefix}{n}" for n in range(1, 21)])
    hub = running_hub()

    summary = _fleet(hub, creds, messages=200)

    assert summary.sent == 4000
    assert summary.acknowledged == 4000
    assert summary.refused == 0 and summary.errors == 0
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= 4000)
    assert count_rows(engine, device_prefix=device_prefix) == 4000
    assert hub.counter("hub_messages_acked_total", transport="tcp") == 4000


def _protocol_errors(hub: HubThread, transport: str) -> float:
    """hub_protocol_errors_total of `transport`, summed over every reason."""
    return sum(
        sample.value
        for metric in hub.app.metrics.registry.collect()
        if metric.name == "hub_protocol_errors"
        for sample in metric.samples
        if sample.name == "hub_protocol_errors_total" and sample.labels["transport"] == transport
    )


def test_writes_split_into_random_pieces_are_all_acknowledged_and_stored_once(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    creds = provision([f"{device_prefix}{n}" for n in range(1, 6)])
    hub = running_hub()

    summary = _fleet(hub, creds, messages=100, fault=SplitRandomly(8, seed=7))

    assert summary.sent == summary.acknowledged == 500
    assert summary.refused == 0 and summary.errors == 0
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= 500)
    assert count_rows(engine, device_prefix=device_prefix) == 500
    assert _protocol_errors(hub, "tcp") == 0


def test_corrupted_writes_are_counted_as_protocol_errors_by_the_hub(
    running_hub: StartHub, provision: Provision, device_prefix: str
) -> None:
    creds = provision([f"{device_prefix}{n}" for n in range(1, 3)])
    # A flipped length byte leaves the hub waiting for the rest of the frame:
    # a short HELLO timeout counts that as a protocol error too.
    hub = running_hub(hello_timeout_s=1.0)

    summary = _fleet(
        hub,
        creds,
        messages=5,
        fault=FlipByte(every=1, seed=3),
        connect_timeout_s=2.0,
        give_up_s=4.0,
    )

    assert not summary.ok
    assert summary.acknowledged == 0  # every HELLO was corrupted
    assert wait_until(lambda: _protocol_errors(hub, "tcp") >= 2, timeout=10)


def test_acknowledged_messages_survive_a_broker_outage(
    connect: Connect,
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
    rabbitmq_vhost: str,
) -> None:
    proxy = CuttableProxy(RABBITMQ_HOST, RABBITMQ_PORT)
    try:
        hub = running_hub(broker_url=amqp_url(rabbitmq_vhost, proxy.port))
        creds = provision([f"{device_prefix}{n}" for n in range(1, 6)])
        device_id, credential = next(iter(creds.items()))
        device = connect(hub.tcp_port)
        assert device.hello(device_id, credential) == Ack(0)
        for seq in range(1, 101):
            device.telemetry(seq, {"n": seq})
        assert device.acks_until(100) == set(range(1, 101))

        proxy.cut()
        # RabbitMQ is unreachable: these are acknowledged from the local spool.
        for seq in range(101, 301):
            device.telemetry(seq, {"n": seq})
        assert device.acks_until(300) >= set(range(101, 301))
        assert wait_until(lambda: hub.counter("hub_envelopes_spooled_total") > 0, timeout=10)
        rest = dict(list(creds.items())[1:])
        summary = _fleet(hub, rest, messages=50)
        assert summary.acknowledged == 200

        proxy.restore()
        expected = 300 + 200
        assert wait_until(
            lambda: count_rows(engine, device_prefix=device_prefix) >= expected, timeout=60
        )
        assert count_rows(engine, device_prefix=device_prefix) == expected
        assert wait_until(lambda: hub.counter("hub_spool_messages") == 0, timeout=10)
        device.close()
    finally:
        proxy.close()


def test_a_full_spool_stops_acknowledging(
    connect: Connect,
    running_hub: StartHub,
    provision: Provision,
    device_prefix: str,
    rabbitmq_vhost: str,
) -> None:
    proxy = CuttableProxy(RABBITMQ_HOST, RABBITMQ_PORT)
    proxy.cut()  # the broker is unreachable from the start
    try:
        hub = running_hub(
            broker_url=amqp_url(rabbitmq_vhost, proxy.port),
            spool_max_messages=20,
            batch_max_messages=10,
            start_without_broker=True,
        )
        ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
        device = connect(hub.tcp_port)
        assert device.hello(device_id, credential) == Ack(0)
        for seq in range(1, 41):
            device.telemetry(seq, {"n": seq})
        acked: set[int] = set()
        with pytest.raises(TimeoutError):
            while True:
                event = device.next_event(timeout=3)
                assert isinstance(event, Ack)
                acked.add(event.seq)
        assert 0 < len(acked) <= 20
        assert hub.counter("hub_spool_messages") <= 20
        device.close()
    finally:
        proxy.close()


def _header(kind: int, length: int, seq: int, *, magic: bytes = b"HB", version: int = 1) -> bytes:
    return struct.pack(">2sBBBII", magic, version, kind, 0, length, seq)


def _frame(kind: int, payload: bytes, seq: int) -> bytes:
    head = _header(kind, len(payload), seq)
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


BAD_INPUTS = {
    "bad_magic": (_header(2, 0, 7, magic=b"XX") + b"\0" * 4, NakReason.MALFORMED),
    "bad_version": (_header(2, 0, 7, version=9) + b"\0" * 4, NakReason.UNSUPPORTED_VERSION),
    "oversize": (_header(2, 50_000_000, 7), NakReason.TOO_LARGE),
    "bad_crc": (_frame(2, b"\0" * 8 + b"{}", 7)[:-1] + b"\x00", NakReason.BAD_CRC),
    "not_json": (_frame(2, b"\0" * 8 + b"{nope", 7), NakReason.BAD_PAYLOAD),
}


def test_bad_input_is_refused_counted_and_leaves_other_devices_alone(
    connect: Connect,
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
) -> None:
    hub = running_hub()
    healthy_id = f"{device_prefix}healthy"
    bad_id = f"{device_prefix}bad"
    creds = provision([healthy_id, bad_id])
    healthy = connect(hub.tcp_port)
    assert healthy.hello(healthy_id, creds[healthy_id]) == Ack(0)
    seq = 0

    def healthy_sends(count: int) -> None:
        nonlocal seq
        for _ in range(count):
            seq += 1
            healthy.telemetry(seq, {"n": seq})
        healthy.acks_until(seq)

    healthy_sends(10)

    unknown = connect(hub.tcp_port)
    assert unknown.hello(f"{device_prefix}nobody", "x") == Nak(
        0, NakReason.UNKNOWN_DEVICE, "unknown_device"
    )
    assert isinstance(unknown.next_event(), ConnectionClosed)
    healthy_sends(10)

    wrong = connect(hub.tcp_port)
    assert wrong.hello(bad_id, "not-the-credential") == Nak(
        0, NakReason.BAD_CREDENTIAL, "bad_credential"
    )
    assert isinstance(wrong.next_event(), ConnectionClosed)
    healthy_sends(10)

    before_hello = connect(hub.tcp_port)
    before_hello.send_raw(_frame(2, b"\0" * 8 + b"{}", 3))
    refusal = before_hello.next_event()
    assert isinstance(refusal, Nak) and refusal.reason is NakReason.NOT_AUTHENTICATED
    healthy_sends(10)

    for name, (data, reason) in BAD_INPUTS.items():
        bad = connect(hub.tcp_port)
        assert bad.hello(bad_id, creds[bad_id]) == Ack(0), name
        bad.send_raw(data)
        refusal = bad.next_event()
        assert isinstance(refusal, Nak), name
        assert refusal.reason is reason, name
        # Without our magic and version there is no header to trust, so no seq to echo.
        assert refusal.seq == (0 if name in ("bad_magic", "bad_version") else 7), name
        assert isinstance(bad.next_event(), ConnectionClosed), name
        healthy_sends(10)

    assert hub.counter("hub_auth_failures_total", transport="tcp", reason="unknown_device") == 1
    assert hub.counter("hub_auth_failures_total", transport="tcp", reason="bad_credential") == 1
    for reason in ("malformed", "unsupported_version", "too_large", "bad_crc", "bad_payload"):
        assert hub.counter("hub_protocol_errors_total", transport="tcp", reason=reason) == 1
    assert wait_until(lambda: count_rows(engine, device_prefix=healthy_id) >= seq)
    assert count_rows(engine, device_prefix=device_prefix) == seq
    healthy.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout(
    connect: Connect, running_hub: StartHub, provision: Provision, device_prefix: str
) -> None:
    hub = running_hub(idle_timeout_s=0.5)
    ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    assert isinstance(device.next_event(timeout=5), ConnectionClosed)


def test_a_port_in_use_is_a_clear_configuration_error(running_hub: StartHub) -> None:
    first = running_hub()
    with pytest.raises(ConfigError, match=r"TCP port \d+ .* already in use.*HUB_TCP_PORT"):
        running_hub(tcp_port=first.tcp_port)


def test_a_device_registered_again_while_the_hub_runs_gets_in(
    running_hub: StartHub,
    provision: Provision,
    connect: Connect,
    engine: Engine,
    device_prefix: str,
) -> None:
    from hub.registry import Registry

    hub = running_hub()
    device_id = f"{device_prefix}1"
    ((_, first),) = provision([device_id]).items()
    assert connect(hub.tcp_port).hello(device_id, first) == Ack(0)  # now cached
    registry = Registry(engine)
    registry.remove(device_id)
    second = registry.add(device_id)

    assert connect(hub.tcp_port).hello(device_id, second) == Ack(0)
    refused = connect(hub.tcp_port).hello(device_id, first)
    assert isinstance(refused, Nak) and refused.reason is NakReason.BAD_CREDENTIAL


def test_status_health_and_metrics_over_http(
    running_hub: StartHub, provision: Provision, connect: Connect, device_prefix: str
) -> None:
    import json
    import urllib.request

    hub = running_hub()
    ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    device.telemetry(1, {"n": 1})
    assert device.acks_until(1) == {1}
    assert hub.app.http is not None
    base = f"http://127.0.0.1:{hub.app.http.port}"

    with urllib.request.urlopen(f"{base}/status", timeout=5) as response:
        status = json.load(response)
    assert status["devices_connected"]["tcp"] == 1
    assert status["broker_connected"] is True and status["spool_messages"] == 0
    assert {x["name"] for x in status["listeners"]} >= {"tcp/native", "http"}
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
        assert response.read() == b"ok\n"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        assert 'hub_messages_acked_total{transport="tcp"} 1.0' in response.read().decode()
