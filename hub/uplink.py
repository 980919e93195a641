"""The one converter from what devices send to envelopes, for every transport.

Layer: core; imports only `hub.envelope`, `hub.errors`, `hub.payloads`,
`hub.protocol.events` and `hub.topics`. Pure functions: no I/O.

Every way in uses it, so that an envelope's id, kind, times and payload mean
the same whatever the device spoke (docs/delivery.md):

- `envelope_from_event`: a codec's TELEMETRY, EVENT or STATE event (TCP);
- `command_result_envelope`: a codec's COMMAND_RESULT event (TCP);
- `envelope_from_payload`: an MQTT PUBLISH on a device topic (embedded broker
  and external bridge), validated against `hub.topics.PayloadLimits`;
- `presence_envelope`: a device's connect or disconnect, on any transport.

`envelope_from_event` is on the TCP hot path (one call per message): it does
the work the bridge did inline before, and nothing more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from hub.envelope import Envelope, Kind, envelope_id
from hub.errors import EnvelopeError
from hub.payloads import check_size, loads_bounded
from hub.protocol.events import CommandResult, DataEvent, DeviceEvent, StateReport, Telemetry
from hub.topics import DEFAULT_LIMITS, DeviceTopic, PayloadLimits

__all__ = [
    "EVENT_KINDS",
    "command_result_envelope",
    "envelope_from_event",
    "envelope_from_payload",
    "presence_envelope",
]

#: The codec events that carry device data, and the kind of envelope each becomes.
EVENT_KINDS: Final[Mapping[type[object], Kind]] = {
    Telemetry: Kind.TELEMETRY,
    DeviceEvent: Kind.EVENT,
    StateReport: Kind.STATE,
}

#: Keys of the structured data form; any other key next to "values" is refused,
#: so that a typo ("sequence") fails loudly instead of silently losing dedup.
_STRUCTURED_KEYS = frozenset({"seq", "boot", "ts", "values"})
_RESULT_KEYS = frozenset({"ok", "result", "error", "seq", "boot", "ts"})
# Bounds keep values inside a signed 64-bit column and a datetime.
_MAX_COUNTER = 2**63 - 1
_MAX_UNIX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


# -- codec events ----------------------------------------------------------------


def envelope_from_event(
    event: DataEvent, kind: Kind, device_id: str, boot_id: int, transport: str, protocol: str
) -> Envelope:
    """The envelope of a data event from `device_id`'s connection whose HELLO named `boot_id`.

    `kind` is `EVENT_KINDS[type(event)]`, passed in because the caller has
    already looked it up to tell data from other events.
    The id derives from (device, boot, seq), so a retransmission gets the same
    id and is processed once. Raises EnvelopeError for a payload an envelope
    cannot carry.
    """
    seq = event.seq
    ms = event.device_time_ms
    return Envelope(
        id=envelope_id(device_id, seq, boot_id),
        device_id=device_id,
        kind=kind,
        seq=seq,
        payload=event.payload,
        device_time=datetime.fromtimestamp(ms / 1000, UTC) if ms else None,
        transport=transport,
        protocol=protocol,
    )


def command_result_envelope(
    event: CommandResult, device_id: str, transport: str, protocol: str
) -> Envelope:
    """The envelope of a device's answer to a command; EnvelopeError if it is not JSON-safe."""
    return Envelope(
        device_id=device_id,
        kind=Kind.COMMAND_RESULT,
        payload={
            "command_id": event.command_id,
            "ok": event.ok,
            "result": event.result,
            "error": event.error,
        },
        transport=transport,
        protocol=protocol,
    )


# -- presence --------------------------------------------------------------------


def presence_envelope(
    device_id: str,
    *,
    online: bool,
    since: datetime,
    transport: str,
    protocol: str,
    at: datetime | None = None,
) -> Envelope:
    """The envelope of a device's connect (`online`) or disconnect.

    `since` is when the connection this concerns was accepted; `at` when the
    connect or disconnect happened (now by default; `since` for a connect).
    """
    when = at or (since if online else datetime.now(UTC))
    return Envelope(
        device_id=device_id,
        kind=Kind.PRESENCE,
        payload={"online": online, "since": since.astimezone(UTC).isoformat()},
        transport=transport,
        protocol=protocol,
        received_at=when,
    )


# -- MQTT payloads ---------------------------------------------------------------


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
