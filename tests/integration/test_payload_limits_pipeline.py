"""Payload limits through a real hub (RabbitMQ mode, a real worker): a deep or
pathological payload is refused on TCP with NAK BAD_PAYLOAD and counted, and on
MQTT acknowledged as invalid and counted, never logged as a bridge failure;
the device's good messages around it are stored."""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from hub.protocol.events import Ack, Nak, NakReason, Telemetry
from hub.storage import count_rows
from tests.support.processes import HubThread, Worker, wait_until
from tests.support.raw_device import RawDevice
from tests.support.raw_mqtt import RawMqttDevice

pytestmark = pytest.mark.integration


def nested_text(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_tcp_refuses_deep_json_with_bad_payload(
    worker: Worker,
    running_hub: Callable[..., HubThread],
    provision: Callable[[list[str]], dict[str, str]],
    engine: Engine,
    connect: Callable[[int], RawDevice],
    device_prefix: str,
) -> None:
    hub = running_hub()
    device_id = f"{device_prefix}deep-tcp"
    ((_, credential),) = provision([device_id]).items()
    for depth in (33, 975):
        device = connect(hub.tcp_port)
        assert device.hello(device_id, credential) == Ack(0)
        device.telemetry(1, {"t": 1})
        assert device.acks_until(1) == {1}
        frame = device.codec.send(Telemetry(2, {}))
        # The same frame with the JSON swapped for a deep document (CRC recomputed).
        device.send_raw(_with_json(frame, nested_text(depth)))
        answer = device.next_event()
        assert isinstance(answer, Nak) and answer.reason == NakReason.BAD_PAYLOAD, answer
    assert hub.counter("hub_protocol_errors_total", transport="tcp", reason="bad_payload") == 2
    assert wait_until(lambda: count_rows(engine, device_prefix=device_id) == 1, timeout=60)


def _with_json(frame: bytes, body: bytes) -> bytes:
    header = bytearray(frame[:13])
    payload = frame[13 : 13 + 8] + body  # device_time_ms, then the JSON
    struct.pack_into(">I", header, 5, len(payload))
    data = bytes(header) + payload
    return data + struct.pack(">I", zlib.crc32(data))


@pytest.mark.parametrize(
    "payload",
    [nested_text(975), b'{"t":' + b"9" * 5000 + b"}", b'{"t":1e999}', b'{"t":NaN}'],
    ids=["deep-975", "int-5000-digits", "1e999", "nan"],
)
def test_mqtt_counts_pathological_payloads_as_invalid(
    worker: Worker,
    running_hub: Callable[..., HubThread],
    provision: Callable[[list[str]], dict[str, str]],
    engine: Engine,
    device_prefix: str,
    caplog: pytest.LogCaptureFixture,
    payload: bytes,
) -> None:
    hub = running_hub(mqtt_enabled=True)
    device_id = f"{device_prefix}mqtt"
    ((_, credential),) = provision([device_id]).items()
    device = RawMqttDevice(hub.mqtt_port, device_id, credential)
    topic = f"devices/{device_id}/telemetry"
    with caplog.at_level(logging.WARNING):
        device.publish_qos1(topic, b'{"seq":1,"values":{"t":1}}')
        device.publish_qos1(topic, payload)  # acknowledged: sending it again cannot help
        device.publish_qos1(topic, b'{"seq":2,"values":{"t":2}}')
        device.close()
    assert hub.counter("hub_invalid_payloads_total", transport="mqtt") == 1
    assert wait_until(lambda: count_rows(engine, device_prefix=device_id) == 2, timeout=60)
    failures = [r for r in caplog.records if "bridge failed" in r.getMessage() or r.exc_info]
    assert not failures, [r.getMessage() for r in failures]
