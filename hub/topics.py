"""The MQTT topic scheme and payload formats, and the per-device topic ACL.

Layer: core. Pure functions only: imports `hub.envelope`, `hub.payloads` and `hub.errors`, and
must not import asyncio, amqtt, paho, `bridges`, `tasks` or `firmware_sim`, so
that the embedded broker, the external-broker bridge, the simulator and the
tests all share one definition of what a device may send.

Device topics (docs/mqtt.md), with `<root>` the `mqtt_topic_root` setting:

    <root>/<device id>/telemetry                       device -> hub
    <root>/<device id>/events                          device -> hub
    <root>/<device id>/state                           device -> hub
    <root>/<device id>/commands                        hub -> device
    <root>/<device id>/commands/<command id>/result    device -> hub

A command carries its id in the payload (`{"id", "name", "args"}`), so a
device needs one subscription, to `<root>/<device id>/commands`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hub.envelope import MAX_DEVICE_ID_CHARS, Envelope, Kind, envelope_id, validate_device_id
from hub.errors import EnvelopeError
from hub.payloads import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_PAYLOAD_DEPTH,
    check_size,
    loads_bounded,
)

#: The last level of a data topic, and the kind of envelope it becomes.
DATA_LEVELS: dict[str, Kind] = {
    "telemetry": Kind.TELEMETRY,
    "events": Kind.EVENT,
    "state": Kind.STATE,
}
COMMANDS_LEVEL = "commands"
RESULT_LEVEL = "result"
MAX_COMMAND_ID_CHARS = 128

#: Keys of the structured data form; any other key next to "values" is refused,
#: so that a typo ("sequence") fails loudly instead of silently losing dedup.
_STRUCTURED_KEYS = frozenset({"seq", "boot", "ts", "values"})
_RESULT_KEYS = frozenset({"ok", "result", "error", "seq", "boot", "ts"})
# Bounds keep values inside a signed 64-bit column and a datetime.
_MAX_COUNTER = 2**63 - 1
_MAX_UNIX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """What an uplink topic names: whose message it is and what kind."""

    device_id: str
    kind: Kind
    command_id: str | None = None


def _is_valid_level(level: str, max_chars: int) -> bool:
    return 0 < len(level) <= max_chars and not any(
        c in "/+# " or not c.isprintable() for c in level
    )


def validate_command_id(command_id: object) -> str:
    """Command ids are 1-128 printable characters without `/`, `+`, `#` or spaces,
    like device ids, because they are a topic level."""
    if not isinstance(command_id, str) or not _is_valid_level(command_id, MAX_COMMAND_ID_CHARS):
        raise EnvelopeError(
            f"command id {command_id!r} must be 1-{MAX_COMMAND_ID_CHARS} printable characters "
            "without '/', '+', '#' or spaces",
            field="command_id",
        )
    return command_id


def _device_levels(topic: str, root: str) -> list[str] | None:
    """The levels after `<root>/`, or None when the topic is not under the root."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        return None
    return topic[len(prefix) :].split("/")


def parse_topic(topic: str, root: str) -> DeviceTopic | None:
    """Parse an uplink (device -> hub) topic; None when `topic` is not one.

    Anything else under the root (command downlink topics, unknown suffixes,
    malformed ids) is not an uplink topic either, so it is never bridged.
    """
    levels = _device_levels(topic, root)
    if levels is None or not _is_valid_level(levels[0], MAX_DEVICE_ID_CHARS):
        return None
    device_id = levels[0]
    if len(levels) == 2 and levels[1] in DATA_LEVELS:
        return DeviceTopic(device_id, DATA_LEVELS[levels[1]])
    if (
        len(levels) == 4
        and levels[1] == COMMANDS_LEVEL
        and levels[3] == RESULT_LEVEL
        and _is_valid_level(levels[2], MAX_COMMAND_ID_CHARS)
    ):
        return DeviceTopic(device_id, Kind.COMMAND_RESULT, levels[2])
    return None


def data_topic(root: str, device_id: str, kind: Kind) -> str:
    """The topic a device publishes `kind` messages on."""
    for level, level_kind in DATA_LEVELS.items():
        if level_kind is kind:
            return f"{root}/{validate_device_id(device_id)}/{level}"
    raise ValueError(f"{kind!r} has no data topic; command results use command_result_topic")


def command_topic(root: str, device_id: str) -> str:
    """The topic the hub publishes a device's commands on; the device subscribes to it."""
    return f"{root}/{validate_device_id(device_id)}/{COMMANDS_LEVEL}"


def command_result_topic(root: str, device_id: str, command_id: str) -> str:
    """The topic a device publishes the result of a command on."""
    return f"{command_topic(root, device_id)}/{validate_command_id(command_id)}/{RESULT_LEVEL}"


def command_message(command_id: str, name: str, args: Mapping[str, Any] | None = None) -> bytes:
    """The payload of a command: `{"id": ..., "name": ..., "args": {...}}`."""
    body = {"id": validate_command_id(command_id), "name": name, "args": dict(args or {})}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def uplink_filters(root: str) -> tuple[str, ...]:
    """Filters matching every device's uplink topics (the external-broker bridge
    subscribes to these, inside a shared-subscription group)."""
    return (
        *(f"{root}/+/{level}" for level in DATA_LEVELS),
        f"{root}/+/{COMMANDS_LEVEL}/+/{RESULT_LEVEL}",
    )


# -- ACL -------------------------------------------------------------------------


def may_publish(device_id: str, topic: str, root: str) -> bool:
    """A device may publish only its own data topics and its own command results."""
    parsed = parse_topic(topic, root)
    return parsed is not None and parsed.device_id == device_id


def may_subscribe(device_id: str, topic_filter: str, root: str) -> bool:
    """A device may subscribe only to its own command topics.

    Allowed: `<root>/<id>/commands` and any filter below `<root>/<id>/commands/`
    (`.../+`, `.../#`, one command id). The root and the device id are literal
    (neither can contain a wildcard), so no allowed filter reaches another
    device's topics.
    """
    own = f"{root}/{device_id}/{COMMANDS_LEVEL}"
    return topic_filter == own or topic_filter.startswith(own + "/")


# -- payloads -------------------------------------------------------------------


def _load_object(data: bytes, limits: PayloadLimits) -> dict[str, Any]:
    if not data:
        raise EnvelopeError("payload is empty; expected a JSON object", field="payload")
    check_size(len(data), limits.max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"payload is not UTF-8: {exc.reason}", field="payload") from None
    try:
        value = loads_bounded(text, limits.max_depth)
    except json.JSONDecodeError as exc:
        raise EnvelopeError(
            f"payload is not JSON: {exc.msg} at {exc.pos}", field="payload"
        ) from None
    except ValueError as exc:
        # NaN, Infinity, 1e999, and integers of more than 4,300 digits (Python's
        # int-conversion limit): not JSON a device may send, and no bridge failure.
        raise EnvelopeError(
            f"payload is not valid JSON: {str(exc)[:120]}", field="payload"
        ) from None
    if not isinstance(value, dict):
        raise EnvelopeError(
            f"payload must be a JSON object, not {type(value).__name__}", field="payload"
        )
    return value


def _counter(obj: Mapping[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    # bool is an int subclass; `true` as a sequence number is a firmware bug.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNTER:
        raise EnvelopeError(
            f"{name} must be an integer from 0 to 2^63-1, not {value!r}", field=name
        )
    return value


def _device_time(obj: Mapping[str, Any]) -> datetime | None:
    value = obj.get("ts")
    if value is None:
        return None
    if isinstance(value, bool):
        raise EnvelopeError("ts must be Unix milliseconds or an ISO 8601 string", field="ts")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 <= value <= _MAX_UNIX_MS:
            raise EnvelopeError(f"ts {value!r} is not a plausible Unix time in ms", field="ts")
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise EnvelopeError(f"ts {value!r} is not ISO 8601", field="ts") from None
        if parsed.tzinfo is None:
            raise EnvelopeError(f"ts {value!r} has no time zone; add 'Z' or an offset", field="ts")
        return parsed.astimezone(UTC)
    raise EnvelopeError(
        f"ts must be Unix milliseconds or an ISO 8601 string, not {type(value).__name__}",
        field="ts",
    )


def _unknown_keys(obj: Mapping[str, Any], allowed: frozenset[str], form: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise EnvelopeError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {form}; "
            f"allowed: {', '.join(sorted(allowed))}",
            field="payload",
        )


def _message_id(device_id: str, seq: int | None, boot: int | None) -> str:
    # No seq: a random id (envelope_id's rule), so a retransmission is not deduplicated.
    return envelope_id(device_id, seq, boot or 0)


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """How deep and how large a device's JSON payload may be (docs/mqtt.md, "Payload limits")."""

    max_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES


DEFAULT_LIMITS = PayloadLimits()


def envelope_from_payload(
    topic: DeviceTopic,
    data: bytes,
    *,
    transport: str = "mqtt",
    protocol: str = "mqtt",
    received_at: datetime | None = None,
    limits: PayloadLimits = DEFAULT_LIMITS,
) -> Envelope:
    """Validate a device's payload on `topic` into an Envelope.

    A payload larger than `limits.max_bytes` or nested deeper than
    `limits.max_depth` is refused (EnvelopeError) before it is looked at.
    Data topics take either `{"seq", "boot", "ts", "values": {...}}` (all but
    `values` optional) or a flat object of values. Command results take
    `{"ok": bool, "result": any, "error": str}` (plus optional seq, boot, ts).
    Raises EnvelopeError with the reason on anything else.
    """
    obj = _load_object(data, limits)
    extra: dict[str, Any] = {} if received_at is None else {"received_at": received_at}
    if topic.kind is Kind.COMMAND_RESULT:
        return _command_result(topic, obj, transport, protocol, extra)
    if "values" in obj:
        _unknown_keys(obj, _STRUCTURED_KEYS, "a payload with 'values'")
        values = obj["values"]
        if not isinstance(values, dict):
            raise EnvelopeError("values must be a JSON object", field="values")
        seq, boot, device_time = _counter(obj, "seq"), _counter(obj, "boot"), _device_time(obj)
    else:
        values, seq, boot, device_time = obj, None, None, None
    return Envelope(
        id=_message_id(topic.device_id, seq, boot),
        device_id=topic.device_id,
        kind=topic.kind,
        payload=values,
        transport=transport,
        protocol=protocol,
        seq=seq,
        device_time=device_time,
        **extra,
    )


def _command_result(
    topic: DeviceTopic,
    obj: dict[str, Any],
    transport: str,
    protocol: str,
    extra: dict[str, Any],
) -> Envelope:
    _unknown_keys(obj, _RESULT_KEYS, "a command result")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise EnvelopeError("ok must be true or false", field="ok")
    error = obj.get("error")
    if error is not None and not isinstance(error, str):
        raise EnvelopeError("error must be a string", field="error")
    seq, boot = _counter(obj, "seq"), _counter(obj, "boot")
    command_id = topic.command_id or ""
    # Without a seq the id derives from the command id, so that a QoS 1
    # retransmission of the same result is still processed once.
    message_id = (
        _message_id(topic.device_id, seq, boot)
        if seq is not None
        else envelope_id(topic.device_id, 0, f"command-result:{command_id}")
    )
    return Envelope(
        id=message_id,
        device_id=topic.device_id,
        kind=Kind.COMMAND_RESULT,
        payload={
            "command_id": command_id,
            "ok": ok,
            "result": obj.get("result"),
            "error": error,
        },
        transport=transport,
        protocol=protocol,
        seq=seq,
        device_time=_device_time(obj),
        **extra,
    )
