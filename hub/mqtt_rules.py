"""MQTT 3.1.1 packet rules: what a client may send, checked on whole packets.

Layer: hub core; imports `hub.errors` only. Pure: no asyncio, no sockets, no
amqtt. The embedded broker's reader (bridges.mqtt.reader) frames a client's
stream into packets and asks `check_packet` about each before amqtt sees a
byte of it; the fuzz target and the unit tests feed it bytes directly.

`check_packet` is the rule book: fixed-header flags, the CONNECT fields,
UTF-8 strings, packet identifiers, topic names and filters. It raises
`ProtocolViolation` with the reason and, when the specification asks for one,
the CONNACK return code to send before closing (docs/mqtt.md, "Limits and
malformed packets").
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.errors import HubError

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)

#: CONNACK return codes sent before closing ([MQTT-3.2.2-4]: session present 0).
UNACCEPTABLE_PROTOCOL_VERSION = 0x01
IDENTIFIER_REJECTED = 0x02

#: Reasons, the `reason` label of hub_protocol_errors_total{transport="mqtt"}.
MALFORMED = "malformed_packet"
TOO_LARGE = "packet_too_large"
CONNECT_TIMEOUT = "connect_timeout"
KEEPALIVE_TIMEOUT = "keepalive_timeout"
PROTOCOL_VIOLATION = "protocol_violation"
TOPIC_TOO_DEEP = "topic_too_deep"

#: The first byte of a CONNECT: type 1, flags 0 [MQTT-2.2.2-2].
CONNECT_BYTE = 0x10
#: The protocol names a CONNECT may begin with, as MQTT strings (length first):
#: MQTT 3.1.1 and later, and MQTT 3.1 (refused with a CONNACK, below).
PROTOCOL_NAMES = (b"\x00\x04MQTT", b"\x00\x06MQIsdp")

# Packets only a server sends: a client sending one breaks the protocol.
_SERVER_ONLY = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}
# Fixed-header flags that are fixed by the specification [MQTT-2.2.2-1], [MQTT-2.2.2-2].
_REQUIRED_FLAGS = {PUBREL: 0b0010, SUBSCRIBE: 0b0010, UNSUBSCRIBE: 0b0010}
_ACKS = {PUBACK: "PUBACK", PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP"}


class ProtocolViolation(HubError):
    """A client broke MQTT 3.1.1; its connection is closed."""

    def __init__(self, message: str, *, reason: str = MALFORMED, connack: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.connack = connack


class PacketTooLarge(ProtocolViolation):
    """A client announced an MQTT packet above `mqtt_max_packet_bytes`."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=TOO_LARGE)


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """The fields of a well-formed CONNECT that the broker needs beyond amqtt's parse."""

    clean_session: bool
    keep_alive_s: int
    client_id: str
    will: bool
    will_qos: int
    will_retain: bool


class _Body:
    """A cursor over a packet's variable header and payload."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def _take(self, size: int, field: str) -> bytes:
        if self._at + size > len(self._data):
            raise ProtocolViolation(f"{self._what}: {field} runs past the end of the packet")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def byte(self, field: str) -> int:
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self._take(2, field), "big")

    def binary(self, field: str) -> bytes:
        return self._take(self.u16(f"{field} length"), field)

    def text(self, field: str) -> str:
        raw = self.binary(field)
        try:
            # Python's strict decoder refuses overlong forms and encoded
            # surrogates (U+D800..U+DFFF), as [MQTT-1.5.3-1] requires.
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{self._what}: {field} is not valid UTF-8") from None
        if "\x00" in value:
            raise ProtocolViolation(f"{self._what}: {field} contains U+0000")  # [MQTT-1.5.3-2]
        return value

    def packet_id(self) -> int:
        value = self.u16("packet identifier")
        if value == 0:
            raise ProtocolViolation(f"{self._what}: packet identifier 0")  # [MQTT-2.3.1-1]
        return value

    @property
    def left(self) -> int:
        return len(self._data) - self._at

    def end(self) -> None:
        if self.left:
            raise ProtocolViolation(f"{self._what}: {self.left} unexpected bytes at the end")


def check_packet(
    packet_type: int,
    flags: int,
    body: bytes,
    *,
    first: bool,
    max_topic_levels: int | None = None,
) -> ConnectInfo | None:
    """Check one complete packet a client sent; raise `ProtocolViolation` if the
    connection must be closed. Returns the CONNECT's fields for a CONNECT.

    `max_topic_levels` (`mqtt_max_topic_levels`) bounds the levels of every
    topic name and filter: the specification allows 32,767 levels in a 64 KiB
    topic, far beyond any device, and every level costs the broker work."""
    if first != (packet_type == CONNECT):
        if first:
            # [MQTT-3.1.0-1]
            raise ProtocolViolation(f"first packet is type {packet_type}, not CONNECT")
        raise ProtocolViolation("a second CONNECT")  # [MQTT-3.1.0-2]
    if packet_type in (0, 15):
        raise ProtocolViolation(f"reserved packet type {packet_type}")
    if packet_type in _SERVER_ONLY:
        raise ProtocolViolation(f"a client sent {_SERVER_ONLY[packet_type]}")
    if packet_type != PUBLISH and flags != _REQUIRED_FLAGS.get(packet_type, 0):
        # [MQTT-2.2.2-1], [MQTT-2.2.2-2]
        raise ProtocolViolation(f"packet type {packet_type} with flags {flags:#06b}")
    levels = max_topic_levels
    if packet_type == CONNECT:
        return _check_connect(_Body(body, "CONNECT"), levels)
    if packet_type == PUBLISH:
        _check_publish(flags, _Body(body, "PUBLISH"), levels)
    elif packet_type in _ACKS:
        packet = _Body(body, _ACKS[packet_type])
        packet.packet_id()
        packet.end()
    elif packet_type == SUBSCRIBE:
        _check_subscribe(_Body(body, "SUBSCRIBE"), levels)
    elif packet_type == UNSUBSCRIBE:
        _check_unsubscribe(_Body(body, "UNSUBSCRIBE"), levels)
    elif body:  # PINGREQ, DISCONNECT
        raise ProtocolViolation(f"packet type {packet_type} with a {len(body)}-byte body")
    return None


def _check_connect(packet: _Body, max_levels: int | None) -> ConnectInfo:
    name = packet.text("protocol name")
    level = packet.byte("protocol level")
    if name == "MQIsdp" or (name == "MQTT" and level != 4):
        # An MQTT version other than 3.1.1 [MQTT-3.1.2-2]. Checked before the
        # rest, which differs between versions (MQTT 5 adds properties).
        raise ProtocolViolation(
            f"CONNECT: unsupported protocol {name} level {level}",
            connack=UNACCEPTABLE_PROTOCOL_VERSION,
        )
    if name != "MQTT":
        raise ProtocolViolation(f"CONNECT: protocol name {name!r}")  # [MQTT-3.1.2-1]
    connect_flags = packet.byte("connect flags")
    keep_alive = packet.u16("keep alive")
    if connect_flags & 0x01:
        raise ProtocolViolation("CONNECT: reserved flag set")  # [MQTT-3.1.2-3]
    clean = bool(connect_flags & 0x02)
    will = bool(connect_flags & 0x04)
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = bool(connect_flags & 0x20)
    has_password = bool(connect_flags & 0x40)
    has_username = bool(connect_flags & 0x80)
    if not will and (will_qos or will_retain):
        # [MQTT-3.1.2-11], [MQTT-3.1.2-13], [MQTT-3.1.2-15]
        raise ProtocolViolation("CONNECT: will QoS or will retain without the will flag")
    if will_qos == 3:
        raise ProtocolViolation("CONNECT: will QoS 3")  # [MQTT-3.1.2-14]
    if has_password and not has_username:
        raise ProtocolViolation("CONNECT: password without user name")  # [MQTT-3.1.2-22]
    client_id = packet.text("client identifier")  # [MQTT-3.1.3-4]
    if will:
        will_topic = packet.text("will topic")
        check_topic_name(will_topic, "CONNECT: will topic", max_levels)
        packet.binary("will message")
    if has_username:
        packet.text("user name")  # [MQTT-3.1.2-19], [MQTT-3.1.3-11]
    if has_password:
        packet.binary("password")  # [MQTT-3.1.2-21]
    # Bytes left over are a field whose flag is clear [MQTT-3.1.2-18], [MQTT-3.1.2-20].
    packet.end()
    if not client_id and not clean:
        raise ProtocolViolation(
            "CONNECT: empty client identifier with clean session 0",
            connack=IDENTIFIER_REJECTED,  # [MQTT-3.1.3-8]
        )
    return ConnectInfo(clean, keep_alive, client_id, will, will_qos, will_retain)


def check_topic_name(topic: str, what: str, max_levels: int | None = None) -> None:
    """A topic name (not a filter): at least one character, no wildcard, at
    most `max_levels` levels."""
    if not topic:
        raise ProtocolViolation(f"{what} is empty")  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(f"{what} {topic[:100]!r} contains a wildcard")  # [MQTT-3.3.2-2]
    check_topic_levels(topic, what, max_levels)


def check_topic_levels(topic: str, what: str, max_levels: int | None) -> None:
    """Refuse a topic name or filter of more than `max_levels` levels."""
    if max_levels is not None and topic.count("/") >= max_levels:
        raise ProtocolViolation(
            f"{what} has {topic.count('/') + 1} levels, more than "
            f"mqtt_max_topic_levels ({max_levels})",
            reason=TOPIC_TOO_DEEP,
        )


def _check_publish(flags: int, packet: _Body, max_levels: int | None) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    if qos == 0 and flags & 0x08:
        raise ProtocolViolation("PUBLISH with QoS 0 and DUP set")  # [MQTT-3.3.1-2]
    check_topic_name(packet.text("topic name"), "PUBLISH: topic", max_levels)  # [MQTT-3.3.2-1]
    if qos:
        packet.packet_id()


def _check_filter(packet: _Body, max_levels: int | None) -> None:
    topic_filter = packet.text("topic filter")  # [MQTT-3.8.3-1], [MQTT-3.10.3-1]
    if not topic_filter:
        raise ProtocolViolation("empty topic filter")  # [MQTT-4.7.3-1]
    check_topic_levels(topic_filter, "topic filter", max_levels)


def _check_subscribe(packet: _Body, max_levels: int | None) -> None:
    packet.packet_id()
    if not packet.left:
        raise ProtocolViolation("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    while packet.left:
        _check_filter(packet, max_levels)
        requested = packet.byte("requested QoS")
        if requested > 2:  # QoS 3, or a reserved bit set [MQTT-3-8.3-4]
            raise ProtocolViolation(f"SUBSCRIBE: requested QoS byte {requested:#04x}")


def _check_unsubscribe(packet: _Body, max_levels: int | None) -> None:
    packet.packet_id()
    if not packet.left:
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
    while packet.left:
        _check_filter(packet, max_levels)
