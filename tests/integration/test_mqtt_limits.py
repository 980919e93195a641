"""The embedded broker against hostile clients: client id takeovers, deep
topics, random first bytes and an empty will message.

Raw packets (tests.integration.test_mqtt_compliance) on the real embedded
broker with a dispatcher double (tests.integration.test_mqtt_embedded.Broker).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_mqtt_compliance import (
    Raw,
    connect_packet,
    packet,
    publish_packet,
    subscribe_packet,
    text,
)
from tests.integration.test_mqtt_embedded import Broker

PINGREQ, PINGRESP, SUBACK = b"\xc0\x00", 13, 9
NOT_AUTHORIZED = 5
#: Far longer than any check below waits: a connection closed within a
#: couple of seconds was closed by the check, not by the CONNECT timeout.
CONNECT_TIMEOUT_S = 30.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    made = Broker(
        tmp_path / "hub",
        mqtt_allow_anonymous=True,
        mqtt_connect_timeout_s=CONNECT_TIMEOUT_S,
        mqtt_max_topic_levels=16,
    ).start()
    yield made
    made.close()


@pytest.fixture
def raws(broker: Broker) -> Iterator[list[Raw]]:
    opened: list[Raw] = []
    yield opened
    for raw in opened:
        raw.close()


def connected(
    broker: Broker,
    raws: list[Raw],
    client_id: str,
    device: str | None,
    *,
    clean: bool = True,
    expect: int = 0,
) -> Raw:
    raw = Raw(broker.port)
    raws.append(raw)
    creds = None
    if device is not None:
        credential = broker.registry.get(device) or broker.provision(device)
        creds = (device, credential)
    raw.send(connect_packet(client_id, creds, clean=clean))
    _present, code = raw.connack()
    assert code == expect, f"{client_id} as {device}: CONNACK {code}, expected {expect}"
    return raw


def still_works(raw: Raw) -> bool:
    raw.send(PINGREQ)
    deadline = time.monotonic() + 3.0
    while (got := raw.read(timeout=max(0.0, deadline - time.monotonic()))) is not None:
        if got.type == PINGRESP:
            return True  # messages delivered before it are skipped
    return False


# -- defect E: a client id belongs to the device holding it ----------------------------------


@pytest.mark.parametrize("clean", [True, False])
def test_a_device_cannot_disconnect_another_by_using_its_client_id(
    broker: Broker, raws: list[Raw], clean: bool
) -> None:
    victim = connected(broker, raws, "victim-1", "victim-1", clean=clean)
    for _attempt in range(5):
        connected(broker, raws, "victim-1", "intruder-1", clean=True, expect=NOT_AUTHORIZED)
    assert still_works(victim), "the intruder's CONNECT disconnected the device"
    refused = broker.counter("hub_auth_failures_total", transport="mqtt", reason="client_id_in_use")
    assert refused == 5


def test_the_same_device_still_takes_over_its_client_id(broker: Broker, raws: list[Raw]) -> None:
    first = connected(broker, raws, "mine-1", "mine-1")
    second = connected(broker, raws, "mine-1", "mine-1")
    assert first.closed_within(3.0)  # the newest connection wins [MQTT-3.1.4-2]
    assert still_works(second)


def test_anonymous_clients_and_devices_cannot_take_each_others_client_ids(
    broker: Broker, raws: list[Raw]
) -> None:
    device = connected(broker, raws, "dev-cid", "dev-2")
    connected(broker, raws, "dev-cid", None, expect=NOT_AUTHORIZED)
    anonymous = connected(broker, raws, "anon-cid", None)
    connected(broker, raws, "anon-cid", "dev-2", expect=NOT_AUTHORIZED)
    assert still_works(device) and still_works(anonymous)
    # Anonymous clients among themselves: a plain broker, the newest wins.
    connected(broker, raws, "anon-cid", None)
    assert anonymous.closed_within(3.0)


def test_a_client_id_is_free_again_once_its_clean_session_ended(
    broker: Broker, raws: list[Raw]
) -> None:
    first = connected(broker, raws, "reused-cid", "dev-3")
    first.send(b"\xe0\x00")  # DISCONNECT
    assert first.closed_within(3.0)
    time.sleep(0.2)
    assert still_works(connected(broker, raws, "reused-cid", "dev-4"))


# -- item 5: an empty will message ------------------------------------------------------------


@pytest.mark.parametrize("keepalive", [0, 30])
def test_a_connect_with_an_empty_will_message_is_answered_at_once(
    broker: Broker, raws: list[Raw], keepalive: int
) -> None:
    raw = Raw(broker.port)
    raws.append(raw)
    # An empty will message is legal [MQTT-3.1.3-10]; with no user name after
    # it, it is the last field of the CONNECT.
    raw.send(connect_packet("empty-will", will=("t/will", b"", 0, False), keepalive=keepalive))
    assert raw.connack(timeout=3.0) == (False, 0)
    assert still_works(raw)


# -- item 6: deep topics -------------------------------------------------------------------------


def test_a_publish_or_subscribe_beyond_the_topic_level_limit_closes_the_connection(
    broker: Broker, raws: list[Raw]
) -> None:
    deepest_allowed = "/".join(["l"] * 16)
    raw = connected(broker, raws, "deep-1", None)
    raw.send(subscribe_packet(1, [(deepest_allowed, 0)]))
    assert raw.expect(SUBACK).body[2] == 0
    raw.send(publish_packet(deepest_allowed, b"{}"))
    assert still_works(raw)

    raw.send(publish_packet(deepest_allowed + "/l", b"{}"))
    assert raw.closed_within(3.0)
    raw = connected(broker, raws, "deep-2", None)
    raw.send(subscribe_packet(1, [(deepest_allowed + "/#", 0)]))
    assert raw.closed_within(3.0)
    assert (
        broker.counter("hub_protocol_errors_total", transport="mqtt", reason="topic_too_deep") == 2
    )


def test_matching_a_topic_of_65535_levels_is_not_quadratic(broker: Broker) -> None:
    mqtt_broker = broker.mqtt._broker
    assert mqtt_broker is not None
    for topic_filter in ("#", "+/+", "/+/#", "devices/+/commands", "a/b", "/"):
        broker.call(mqtt_broker.add_subscription((topic_filter, 0), _session("s-" + topic_filter)))
    deep = "/" * 65534  # 65,535 empty levels: 64 KiB, legal in MQTT

    def match() -> tuple[float, list[str]]:
        started = time.perf_counter()
        found = mqtt_broker.matching_filters(deep)
        return time.perf_counter() - started, found

    took, found = broker.call_soon(match)
    assert sorted(found) == ["#", "/+/#"]
    assert sorted(broker.call_soon(lambda: mqtt_broker.matching_filters("/"))) == [
        "#",
        "+/+",
        "/",
        "/+/#",
    ]
    # Not a speed test: building every prefix (the quadratic way) took 11.6 s
    # here, the linear way a few milliseconds; 2 s separates the two on any
    # machine slow enough to matter.
    assert took < 2.0, f"matching one deep topic blocked the event loop for {took:.1f} s"


def _session(client_id: str) -> object:
    from amqtt.session import Session

    from bridges.mqtt.state import state_of

    session = Session()
    session.client_id = client_id
    state_of(session).authenticated = True  # an anonymous client
    return session


# -- defect D on MQTT: a connection limit -------------------------------------------------------


def test_connections_beyond_the_limit_are_closed_at_once_and_counted(tmp_path: Path) -> None:
    limited = Broker(
        tmp_path / "limited", mqtt_allow_anonymous=True, mqtt_max_connections=3
    ).start()
    raws: list[Raw] = []
    try:
        client = connected(limited, raws, "inside", None)
        raws += [Raw(limited.port), Raw(limited.port)]  # silent, within the limit
        time.sleep(0.5)
        for _ in range(4):
            extra = Raw(limited.port)
            raws.append(extra)
            assert extra.closed_within(3.0), "a connection beyond the limit stayed open"
        refused = limited.counter(
            "hub_connections_refused_total", transport="mqtt", reason="connection_limit"
        )
        assert refused == 4
        assert still_works(client)
        raws[1].close()
        time.sleep(0.5)
        assert still_works(connected(limited, raws, "after", None))
    finally:
        for raw in raws:
            raw.close()
        limited.close()


# -- defect H: the first packet is refused from its first bytes ---------------------------------


@pytest.mark.parametrize(
    ("case", "data"),
    [
        ("PUBLISH first, announcing 200 kB", b"\x30\xc0\x9a\x0c" + text("t") + b"{"),
        ("type 0, announcing 2 MB", b"\x00\xff\xff\x7f"),
        ("CONNECT flags set", b"\x11\x80\x10" + text("MQTT")),
        ("CONNECT of 100 kB not naming MQTT", b"\x10\xa0\x8d\x06\x00\x04XQTT\x04"),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n"),
    ],
)
def test_random_first_bytes_are_refused_at_once(
    broker: Broker, raws: list[Raw], case: str, data: bytes
) -> None:
    raw = Raw(broker.port)
    raws.append(raw)
    raw.send(data)
    # The CONNECT timeout is 30 s: closed within 3 s means refused on sight.
    assert raw.closed_within(3.0), f"{case}: the connection waited for the rest"
    assert broker.counter("hub_protocol_errors_total", transport="mqtt", reason="malformed_packet")


def test_a_connect_announcing_more_than_the_packet_limit_is_refused_from_its_length(
    broker: Broker, raws: list[Raw]
) -> None:
    raw = Raw(broker.port)
    raws.append(raw)
    raw.send(b"\x10\xff\xff\xff\x7f" + text("MQTT"))  # 256 MB announced
    assert raw.closed_within(3.0)
    assert broker.counter("hub_protocol_errors_total", transport="mqtt", reason="packet_too_large")


def test_a_valid_connect_sent_byte_by_byte_is_still_accepted(
    broker: Broker, raws: list[Raw]
) -> None:
    raw = Raw(broker.port)
    raws.append(raw)
    for byte in connect_packet("slow-but-fine"):
        raw.send(bytes([byte]))
    assert raw.connack() == (False, 0)
    raw.send(packet(0xC0, b""))
    assert raw.expect(PINGRESP)
