"""Unit tests for the MQTT 3.1.1 packet rules (hub/mqtt_rules.py), fed bytes.

Each case is a whole packet as a client sends it: fixed header, remaining
length and body. The rules see the type, the flags and the body, as the
packet reader (bridges.mqtt.reader) hands them over.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.mqtt_rules import (
    CONNECT,
    IDENTIFIER_REJECTED,
    MALFORMED,
    PUBLISH,
    TOPIC_TOO_DEEP,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnectInfo,
    ProtocolViolation,
    check_packet,
)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def packet(header: int, body: bytes) -> bytes:
    """A whole packet; the remaining length of these vectors fits one byte."""
    assert len(body) < 128
    return bytes([header, len(body)]) + body


def check(wire: bytes, *, first: bool = False, max_topic_levels: int | None = None) -> object:
    """Split a whole packet the way the reader does and ask the rules."""
    header, length, body = wire[0], wire[1], wire[2:]
    assert length == len(body)
    return check_packet(
        header >> 4, header & 0x0F, body, first=first, max_topic_levels=max_topic_levels
    )


def connect(
    flags: int = 0x02,
    client_id: str | bytes = "dev-1",
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    rest: bytes = b"",
) -> bytes:
    body = string(name) + bytes([level, flags]) + (60).to_bytes(2, "big")
    return packet(0x10, body + string(client_id) + rest)


# -- golden vectors that pass ----------------------------------------------------------

CONNECT_MINIMAL = bytes.fromhex("101000044d5154540402003c000464657631")  # clean, "dev1"


def test_a_minimal_connect_passes_and_reports_its_fields() -> None:
    assert connect(client_id="dev1") == CONNECT_MINIMAL
    info = check(CONNECT_MINIMAL, first=True)
    assert info == ConnectInfo(
        clean_session=True, keep_alive_s=60, client_id="dev1", will=False, will_qos=0,
        will_retain=False,
    )  # fmt: skip


def test_a_connect_with_will_user_and_password_passes() -> None:
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02  # user, password, retain, QoS 1, will, clean
    rest = string("devices/dev1/state") + string(b"gone") + string("dev1") + string(b"secret")
    info = check(connect(flags, "dev1", rest=rest), first=True)
    assert isinstance(info, ConnectInfo)
    assert (info.will, info.will_qos, info.will_retain) == (True, 1, True)


@pytest.mark.parametrize(
    "wire",
    [
        packet(0x30, string("devices/dev1/telemetry") + b"{}"),  # QoS 0
        packet(0x32, string("devices/dev1/telemetry") + b"\x00\x01{}"),  # QoS 1
        packet(0x3D, string("a/b") + b"\x00\x07"),  # QoS 2, DUP, RETAIN
        packet(0x40, b"\x00\x01"),  # PUBACK
        packet(0x50, b"\x00\x01"),  # PUBREC
        packet(0x62, b"\x00\x01"),  # PUBREL
        packet(0x70, b"\x00\x01"),  # PUBCOMP
        packet(0x82, b"\x00\x01" + string("devices/dev1/commands/#") + b"\x01"),  # SUBSCRIBE
        packet(0xA2, b"\x00\x02" + string("a/+") + string("b")),  # UNSUBSCRIBE
        bytes.fromhex("c000"),  # PINGREQ
        bytes.fromhex("e000"),  # DISCONNECT
    ],
)
def test_well_formed_packets_after_the_connect_pass(wire: bytes) -> None:
    assert check(wire) is None


# -- golden vectors that close the connection ---------------------------------------------


@pytest.mark.parametrize(
    ("wire", "first", "why"),
    [
        (bytes.fromhex("c000"), True, "not CONNECT"),  # [MQTT-3.1.0-1]
        (CONNECT_MINIMAL, False, "a second CONNECT"),  # [MQTT-3.1.0-2]
        (bytes.fromhex("0000"), False, "reserved packet type 0"),
        (bytes.fromhex("f000"), False, "reserved packet type 15"),
        (bytes.fromhex("20020000"), False, "a client sent CONNACK"),
        (bytes.fromhex("9003000100"), False, "a client sent SUBACK"),
        (bytes.fromhex("d000"), False, "a client sent PINGRESP"),
        (bytes.fromhex("60020001"), False, "flags"),  # PUBREL without 0b0010 [MQTT-2.2.2-1]
        (bytes.fromhex("c100"), False, "flags"),  # PINGREQ with a flag set
        (bytes.fromhex("c00100"), False, "1-byte body"),
        (bytes.fromhex("40020000"), False, "packet identifier 0"),  # [MQTT-2.3.1-1]
        (bytes.fromhex("400300010a"), False, "unexpected bytes"),
        (bytes.fromhex("400100"), False, "runs past the end"),
        (packet(0x36, string("a") + b"\x00\x01"), False, "QoS 3"),  # [MQTT-3.3.1-4]
        (packet(0x38, string("a")), False, "QoS 0 and DUP"),  # [MQTT-3.3.1-2]
        (packet(0x30, string("")), False, "is empty"),  # [MQTT-4.7.3-1]
        (packet(0x30, string("a/+")), False, "wildcard"),  # [MQTT-3.3.2-2]
        (packet(0x30, string("a/#")), False, "wildcard"),
        (packet(0x30, string(b"\xc0\xaf")), False, "not valid UTF-8"),  # overlong "/"
        (packet(0x30, string(b"\xed\xa0\x80")), False, "not valid UTF-8"),  # a surrogate
        (packet(0x30, string("a\x00b")), False, "U+0000"),  # [MQTT-1.5.3-2]
        (packet(0x82, b"\x00\x01"), False, "without a topic filter"),  # [MQTT-3.8.3-3]
        (packet(0x82, b"\x00\x01" + string("a") + b"\x03"), False, "requested QoS"),
        (packet(0x82, b"\x00\x01" + string("a") + b"\x80"), False, "requested QoS"),
        (packet(0x82, b"\x00\x01" + string("") + b"\x00"), False, "empty topic filter"),
        (packet(0xA2, b"\x00\x01"), False, "without a topic filter"),  # [MQTT-3.10.3-2]
        (connect(name=b"MQTX"), True, "protocol name"),  # [MQTT-3.1.2-1]
        (connect(0x03), True, "reserved flag"),  # [MQTT-3.1.2-3]
        (connect(0x22), True, "without the will flag"),  # [MQTT-3.1.2-13]
        (connect(0x0A), True, "without the will flag"),  # [MQTT-3.1.2-11]
        (connect(0x1E, rest=string("t") + string(b"")), True, "will QoS 3"),
        (connect(0x42, rest=string(b"pw")), True, "password without user name"),
        (connect(0x02, rest=b"\x00"), True, "unexpected bytes"),  # [MQTT-3.1.2-18]
        (connect(0x06, rest=string("a/+") + string(b"")), True, "wildcard"),
    ],
)
def test_malformed_packets_are_violations(wire: bytes, first: bool, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=re.escape(why)) as caught:
        check(wire, first=first)
    assert caught.value.reason == MALFORMED
    assert caught.value.connack is None


@pytest.mark.parametrize(
    ("wire", "connack"),
    [
        (connect(level=5), UNACCEPTABLE_PROTOCOL_VERSION),  # MQTT 5 [MQTT-3.1.2-2]
        (connect(name=b"MQIsdp", level=3), UNACCEPTABLE_PROTOCOL_VERSION),  # MQTT 3.1
        (connect(0x00, ""), IDENTIFIER_REJECTED),  # clean session 0, no id [MQTT-3.1.3-8]
    ],
)
def test_refused_connects_name_the_connack_to_send(wire: bytes, connack: int) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        check(wire, first=True)
    assert caught.value.connack == connack


def test_an_empty_client_id_with_clean_session_passes() -> None:
    info = check(connect(0x02, ""), first=True)
    assert isinstance(info, ConnectInfo) and info.client_id == ""


@pytest.mark.parametrize(
    "wire",
    [
        packet(0x30, string("a/b/c/d")),
        packet(0x82, b"\x00\x01" + string("a/b/c/#") + b"\x00"),
        packet(0xA2, b"\x00\x01" + string("+/+/+/+")),
    ],
)
def test_topics_deeper_than_the_limit_are_refused_with_their_own_reason(wire: bytes) -> None:
    assert check(wire, max_topic_levels=4) is None
    with pytest.raises(ProtocolViolation, match="mqtt_max_topic_levels") as caught:
        check(wire, max_topic_levels=3)
    assert caught.value.reason == TOPIC_TOO_DEEP


def test_a_will_topic_deeper_than_the_limit_is_refused() -> None:
    wire = connect(0x06, rest=string("a/b/c") + string(b""))
    with pytest.raises(ProtocolViolation) as caught:
        check(wire, first=True, max_topic_levels=2)
    assert caught.value.reason == TOPIC_TOO_DEEP


# -- random bytes ----------------------------------------------------------------------------


@given(
    packet_type=st.integers(0, 15),
    flags=st.integers(0, 15),
    body=st.binary(max_size=64),
    first=st.booleans(),
)
def test_random_packets_only_pass_or_raise_the_violation(
    packet_type: int, flags: int, body: bytes, first: bool
) -> None:
    try:
        result = check_packet(packet_type, flags, body, first=first, max_topic_levels=8)
    except ProtocolViolation:
        return
    assert (result is not None) == (packet_type == CONNECT)
    assert first == (packet_type == CONNECT)


@given(topic=st.text(min_size=1, max_size=40).filter(lambda t: not set(t) & {"+", "#", "\0"}))
def test_any_publish_topic_without_wildcards_passes(topic: str) -> None:
    body = string(topic) + b"payload"
    assert check_packet(PUBLISH, 0, body, first=False) is None
