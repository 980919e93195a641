"""The MQTT topic scheme, payload validation and ACL predicates (hub.topics)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.envelope import Kind, envelope_id
from hub.errors import EnvelopeError
from hub.topics import (
    DeviceTopic,
    command_message,
    command_result_topic,
    command_topic,
    data_topic,
    may_publish,
    may_subscribe,
    parse_topic,
    uplink_filters,
)
from hub.uplink import envelope_from_payload

ROOT = "devices"
TELEMETRY = DeviceTopic("dev-1", Kind.TELEMETRY)


def payload(obj: object) -> bytes:
    return json.dumps(obj).encode()


# -- topics -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/dev-1/telemetry", DeviceTopic("dev-1", Kind.TELEMETRY)),
        ("devices/dev-1/events", DeviceTopic("dev-1", Kind.EVENT)),
        ("devices/dev-1/state", DeviceTopic("dev-1", Kind.STATE)),
        (
            "devices/dev-1/commands/c-42/result",
            DeviceTopic("dev-1", Kind.COMMAND_RESULT, "c-42"),
        ),
    ],
)
def test_parse_uplink_topics(topic: str, expected: DeviceTopic) -> None:
    assert parse_topic(topic, ROOT) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "devices/dev-1/telemetry/extra",
        "devices/dev-1/commands/c-42",  # downlink, not uplink
        "devices/dev-1/commands/result",
        "devices/dev-1/commands//result",
        "devices//telemetry",
        "devices/dev-1",
        "devices/dev-1/presence",
        "other/dev-1/telemetry",
        "devicesX/dev-1/telemetry",
        "/devices/dev-1/telemetry",
        "devices/dev 1/telemetry",
        "devices/" + "x" * 129 + "/telemetry",
        "",
    ],
)
def test_parse_refuses_non_uplink_topics(topic: str) -> None:
    assert parse_topic(topic, ROOT) is None


def test_multi_level_root() -> None:
    assert parse_topic("acme/site-1/dev-1/state", "acme/site-1") == DeviceTopic("dev-1", Kind.STATE)
    assert parse_topic("acme/dev-1/state", "acme/site-1") is None


def test_builders_round_trip() -> None:
    for kind in (Kind.TELEMETRY, Kind.EVENT, Kind.STATE):
        assert parse_topic(data_topic(ROOT, "d", kind), ROOT) == DeviceTopic("d", kind)
    assert command_topic(ROOT, "d") == "devices/d/commands"
    assert parse_topic(command_topic(ROOT, "d"), ROOT) is None  # downlink only
    assert parse_topic(command_result_topic(ROOT, "d", "c1"), ROOT) == DeviceTopic(
        "d", Kind.COMMAND_RESULT, "c1"
    )
    assert may_subscribe("d", command_topic(ROOT, "d"), ROOT)
    assert json.loads(command_message("c1", "reboot", {"delay": 1})) == {
        "id": "c1",
        "name": "reboot",
        "args": {"delay": 1},
    }
    assert uplink_filters(ROOT) == (
        "devices/+/telemetry",
        "devices/+/events",
        "devices/+/state",
        "devices/+/commands/+/result",
    )


@pytest.mark.parametrize(
    ("device_id", "command_id"), [("a/b", "c"), ("a", "c/d"), ("a", "+"), ("", "c")]
)
def test_builders_refuse_bad_ids(device_id: str, command_id: str) -> None:
    with pytest.raises(EnvelopeError):
        command_result_topic(ROOT, device_id, command_id)
    with pytest.raises(EnvelopeError):
        command_message(command_id if command_id != "c" else "", "reboot")


def test_data_topic_refuses_command_result_kind() -> None:
    with pytest.raises(ValueError, match="command_result_topic"):
        data_topic(ROOT, "d", Kind.COMMAND_RESULT)


# -- ACL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("devices/dev-1/telemetry", True),
        ("devices/dev-1/events", True),
        ("devices/dev-1/state", True),
        ("devices/dev-1/commands/c1/result", True),
        ("devices/dev-2/telemetry", False),
        ("devices/dev-2/commands/c1/result", False),
        ("devices/dev-1/commands/c1", False),  # only the hub sends commands
        ("devices/dev-1/anything", False),
        ("other/dev-1/telemetry", False),
        ("devices/dev-10/telemetry", False),
    ],
)
def test_may_publish(topic: str, allowed: bool) -> None:
    assert may_publish("dev-1", topic, ROOT) is allowed


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("devices/dev-1/commands", True),
        ("devices/dev-1/commands/+", True),
        ("devices/dev-1/commands/#", True),
        ("devices/dev-1/commands/c1", True),
        ("devices/dev-1/#", False),
        ("devices/+/commands/+", False),
        ("devices/#", False),
        ("#", False),
        ("+/dev-1/commands/+", False),
        ("devices/dev-2/commands/+", False),
        ("devices/dev-1/telemetry", False),
        ("devices/dev-10/commands/+", False),
        ("devices/dev-1/commandsX", False),
        ("$share/g/devices/dev-1/commands/+", False),
    ],
)
def test_may_subscribe(topic_filter: str, allowed: bool) -> None:
    assert may_subscribe("dev-1", topic_filter, ROOT) is allowed


def _matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 topic matching, written independently for the property test."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or level not in ("+", t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


_level = st.sampled_from(["devices", "dev-1", "dev-2", "commands", "c1", "result", "+", "#", ""])


@given(st.lists(_level, min_size=1, max_size=6))
def test_allowed_filters_never_reach_another_device(levels: list[str]) -> None:
    topic_filter = "/".join(levels)
    if not may_subscribe("dev-1", topic_filter, ROOT):
        return
    for other in (
        "devices/dev-2/commands/c1",
        "devices/dev-2/telemetry",
        "devices/dev-2/commands/c1/result",
        "devices/dev-1/telemetry",
    ):
        assert not _matches(other, topic_filter), (topic_filter, other)


# -- payloads -----------------------------------------------------------------------


def test_structured_payload() -> None:
    env = envelope_from_payload(
        TELEMETRY,
        payload({"seq": 7, "boot": 3, "ts": 1_700_000_000_123, "values": {"t": 21.5}}),
    )
    assert env.device_id == "dev-1"
    assert env.kind is Kind.TELEMETRY
    assert env.payload == {"t": 21.5}
    assert env.seq == 7
    assert env.id == envelope_id("dev-1", 7, 3)
    assert env.device_time == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert (env.transport, env.protocol) == ("mqtt", "mqtt")


def test_retransmission_has_the_same_id_and_boot_changes_it() -> None:
    first = envelope_from_payload(TELEMETRY, payload({"seq": 1, "values": {}}))
    again = envelope_from_payload(TELEMETRY, payload({"seq": 1, "values": {}}))
    rebooted = envelope_from_payload(TELEMETRY, payload({"seq": 1, "boot": 2, "values": {}}))
    assert first.id == again.id == envelope_id("dev-1", 1, 0)
    assert rebooted.id != first.id


def test_flat_payload_is_the_whole_object() -> None:
    env = envelope_from_payload(TELEMETRY, payload({"t": 1, "seq": 5}))
    assert env.payload == {"t": 1, "seq": 5}
    assert env.seq is None
    assert env.device_time is None
    other = envelope_from_payload(TELEMETRY, payload({"t": 1, "seq": 5}))
    assert other.id != env.id  # no seq given: random ids, no dedup


def test_iso_timestamp() -> None:
    env = envelope_from_payload(
        TELEMETRY, payload({"ts": "2024-05-01T12:00:00+02:00", "values": {"a": 1}})
    )
    assert env.device_time == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    env = envelope_from_payload(TELEMETRY, payload({"ts": "2024-05-01T12:00:00Z", "values": {}}))
    assert env.device_time == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xfe", "UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object, not list"),
        (b"42", "JSON object, not int"),
        (b'{"t": NaN}', "NaN"),
        (b'{"t": Infinity}', "Infinity"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b"[" * 40_000 + b"]" * 40_000, "more than the limit of 65536"),
        (payload({"values": [1]}), "values must be a JSON object"),
        (payload({"values": {}, "sequence": 1}), "unknown key"),
        (payload({"values": {}, "seq": -1}), "seq must be an integer"),
        (payload({"values": {}, "seq": "1"}), "seq must be an integer"),
        (payload({"values": {}, "seq": True}), "seq must be an integer"),
        (payload({"values": {}, "seq": 2**63}), "seq must be an integer"),
        (payload({"values": {}, "boot": 1.5}), "boot must be an integer"),
        (payload({"values": {}, "ts": "yesterday"}), "not ISO 8601"),
        (payload({"values": {}, "ts": "2024-05-01T12:00:00"}), "no time zone"),
        (payload({"values": {}, "ts": -1}), "plausible"),
        (payload({"values": {}, "ts": 10**20}), "plausible"),
        (payload({"values": {}, "ts": True}), "Unix milliseconds"),
        (payload({"values": {}, "ts": [1]}), "Unix milliseconds"),
    ],
)
def test_invalid_payloads(data: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        envelope_from_payload(TELEMETRY, data)


def test_command_result() -> None:
    topic = DeviceTopic("dev-1", Kind.COMMAND_RESULT, "c-9")
    env = envelope_from_payload(topic, payload({"ok": True, "result": {"rebooted": True}}))
    assert env.kind is Kind.COMMAND_RESULT
    assert env.payload == {
        "command_id": "c-9",
        "ok": True,
        "result": {"rebooted": True},
        "error": None,
    }
    again = envelope_from_payload(topic, payload({"ok": True, "result": {"rebooted": True}}))
    assert env.id == again.id  # keyed by the command id: a retransmission dedups
    other = DeviceTopic("dev-1", Kind.COMMAND_RESULT, "c-10")
    assert envelope_from_payload(other, payload({"ok": True})).id != env.id
    failed = envelope_from_payload(topic, payload({"ok": False, "error": "busy"}))
    assert failed.payload["error"] == "busy"
    assert failed.payload["result"] is None


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"result": 1}, "ok must be true or false"),
        ({"ok": "yes"}, "ok must be true or false"),
        ({"ok": False, "error": 3}, "error must be a string"),
        ({"ok": True, "values": {}}, "unknown key"),
    ],
)
def test_invalid_command_results(obj: object, reason: str) -> None:
    topic = DeviceTopic("dev-1", Kind.COMMAND_RESULT, "c-9")
    with pytest.raises(EnvelopeError, match=reason):
        envelope_from_payload(topic, payload(obj))


def test_received_at_is_passed_through() -> None:
    when = datetime(2024, 1, 1, tzinfo=UTC)
    env = envelope_from_payload(TELEMETRY, payload({"a": 1}), received_at=when)
    assert env.received_at == when
