"""The MQTT topic scheme, its payload limits, and the per-device topic ACL.

Layer: core. Pure functions only: imports `hub.envelope`, `hub.payloads` and `hub.errors`, and
must not import asyncio, amqtt, paho, `bridges`, `tasks` or `firmware_sim`, so
that the embedded broker, the external-broker bridge, the simulator and the
tests all share one definition of where a device may send. What a payload
must look like, and how it becomes an envelope, is `hub.uplink`'s.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hub.envelope import MAX_DEVICE_ID_CHARS, Kind, validate_device_id
from hub.errors import EnvelopeError
from hub.payloads import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_DEPTH

#: The last level of a data topic, and the kind of envelope it becomes.
DATA_LEVELS: dict[str, Kind] = {
    "telemetry": Kind.TELEMETRY,
    "events": Kind.EVENT,
    "state": Kind.STATE,
}
COMMANDS_LEVEL = "commands"
RESULT_LEVEL = "result"
MAX_COMMAND_ID_CHARS = 128


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


# -- payload limits (applied by hub.uplink.envelope_from_payload) ----------------


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """How deep and how large a device's JSON payload may be (docs/mqtt.md, "Payload limits")."""

    max_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES


DEFAULT_LIMITS = PayloadLimits()
