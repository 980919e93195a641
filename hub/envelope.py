"""The normalized envelope: the only thing that crosses from bridges to tasks.

Layer: core; imports only `hub.errors` and `hub.payloads`.

Every device message, whichever transport and protocol it came by, becomes one
`Envelope`. It serializes to a JSON-safe dict for Celery and validates when it
is read back; a bad envelope raises `EnvelopeError`, which is never retried.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hub.errors import EnvelopeError
from hub.payloads import (
    MAX_PAYLOAD_BYTES_CEILING,
    MAX_PAYLOAD_DEPTH_CEILING,
    PayloadTooDeep,
    PayloadTooLarge,
)

SCHEMA_VERSION = 1
MAX_DEVICE_ID_CHARS = 128


class Kind(enum.StrEnum):
    """What a device message means; routes it to a queue and a task."""

    TELEMETRY = "telemetry"
    EVENT = "event"
    STATE = "state"
    COMMAND_RESULT = "command_result"
    PRESENCE = "presence"


def envelope_id(device_id: str, seq: int | None, boot_id: int | str = 0) -> str:
    """The id of a message: derived from device id, boot id and sequence number
    where the device gives one, so that a retransmission carries the same id and
    is processed once; random otherwise.

    The boot id (chosen by the device at power-up, see docs/protocol.md) keeps a
    device that restarts its sequence counter from having its new messages taken
    for retransmissions of old ones.
    """
    if seq is None:
        return uuid.uuid4().hex
    digest = hashlib.blake2b(f"{device_id}\x00{boot_id}\x00{seq}".encode(), digest_size=16)
    return digest.hexdigest()


def _utc_from(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EnvelopeError(f"{name} must be an ISO 8601 string", field=name)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise EnvelopeError(f"{name} is not ISO 8601: {value!r}", field=name) from exc
    if parsed.tzinfo is None:
        raise EnvelopeError(f"{name} must carry a time zone", field=name)
    return parsed.astimezone(UTC)


#: Characters a device id may not hold besides the unprintable ones.
_TOPIC_CHARS = re.compile("[/+# ]")


def validate_device_id(device_id: object) -> str:
    """Device ids are 1-128 printable characters without `/`, `+`, `#` or spaces,
    so that they are safe as MQTT topic levels and in file names."""
    if not isinstance(device_id, str) or not device_id:
        raise EnvelopeError("device_id must be a non-empty string", field="device_id")
    if len(device_id) > MAX_DEVICE_ID_CHARS:
        raise EnvelopeError("device_id is longer than 128 characters", field="device_id")
    # The whole string at once (C), not a generator per character: this runs
    # for every envelope a worker reads.
    if not device_id.isprintable() or _TOPIC_CHARS.search(device_id):
        raise EnvelopeError(
            f"device_id {device_id!r} contains '/', '+', '#', a space or a control character",
            field="device_id",
        )
    return device_id


def _check_json_safe(value: object, path: str) -> None:
    """EnvelopeError unless `value` is JSON-safe, at most MAX_PAYLOAD_DEPTH_CEILING
    deep and about MAX_PAYLOAD_BYTES_CEILING large.

    Iterative on purpose: a recursive walk would itself fail (RecursionError)
    on the deeply nested input it must refuse. The size is an estimate of the
    JSON text (strings and keys by length, other scalars a few bytes each),
    enough to refuse an envelope no bridge would have let in.
    """
    if isinstance(value, Mapping) and _flat_and_safe(value):
        return
    size = 0
    # (value, depth, parent path, key in the parent): a path string is built
    # only for containers and errors, not for every scalar.
    stack: list[tuple[object, int, str, str | int | None]] = [(value, 0, path, None)]
    while stack:
        item, depth, parent, key = stack.pop()
        if item is None or isinstance(item, bool):
            size += 5
        elif isinstance(item, str):
            size += len(item) + 3
        elif isinstance(item, int):
            size += 8
        elif isinstance(item, float):
            if not math.isfinite(item):
                where = _path(parent, key)
                raise EnvelopeError(f"{where} is not a finite number", field="payload")
            size += 8
        elif isinstance(item, (list, tuple, Mapping)):
            if depth >= MAX_PAYLOAD_DEPTH_CEILING:
                raise PayloadTooDeep(
                    f"payload is nested too deeply (more than {MAX_PAYLOAD_DEPTH_CEILING} levels)",
                    field="payload",
                )
            where = _path(parent, key)
            size += 2
            if isinstance(item, Mapping):
                for name, child in item.items():
                    if not isinstance(name, str):
                        raise EnvelopeError(
                            f"{where} has a non-string key {name!r}", field="payload"
                        )
                    size += len(name) + 4
                    stack.append((child, depth + 1, where, name))
            else:
                stack.extend((child, depth + 1, where, i) for i, child in enumerate(item))
        else:
            where = _path(parent, key)
            raise EnvelopeError(
                f"{where} is not JSON-safe ({type(item).__name__})", field="payload"
            )
        if size > MAX_PAYLOAD_BYTES_CEILING:
            raise PayloadTooLarge(
                f"payload is larger than {MAX_PAYLOAD_BYTES_CEILING} bytes", field="payload"
            )


_SCALARS = frozenset({str, int, bool, type(None)})


def _flat_and_safe(mapping: Mapping[Any, Any]) -> bool:
    """The common case, fast: string keys and plain scalar values only (a flat
    payload of readings). False sends anything else to the full walk."""
    size = 2
    for key, item in mapping.items():
        kind = type(item)
        if type(key) is not str:
            return False
        if kind is str:
            size += len(key) + len(item) + 7
        elif kind in _SCALARS or (kind is float and math.isfinite(item)):
            size += len(key) + 12
        else:
            return False
    return size <= MAX_PAYLOAD_BYTES_CEILING


def _path(parent: str, key: str | int | None) -> str:
    if key is None:
        return parent
    return f"{parent}[{key}]" if isinstance(key, int) else f"{parent}.{key}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One device message, normalized.

    `payload` must be a JSON-safe mapping; `device_time` is what the device
    claimed (may be None), `received_at` when the hub read it, both UTC.
    """

    device_id: str
    kind: Kind
    payload: Mapping[str, Any]
    transport: str
    protocol: str
    id: str = ""
    seq: int | None = None
    device_time: datetime | None = None
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if not isinstance(self.kind, Kind):
            try:
                object.__setattr__(self, "kind", Kind(self.kind))
            except ValueError as exc:
                raise EnvelopeError(f"unknown kind {self.kind!r}", field="kind") from exc
        # type() first: isinstance against the Mapping ABC is slow, and a
        # payload is almost always a plain dict.
        if type(self.payload) is not dict and not isinstance(self.payload, Mapping):
            raise EnvelopeError("payload must be a mapping", field="payload")
        _check_json_safe(self.payload, "payload")
        if self.seq is not None and (not isinstance(self.seq, int) or self.seq < 0):
            raise EnvelopeError("seq must be a non-negative integer", field="seq")
        if not self.id:
            object.__setattr__(self, "id", envelope_id(self.device_id, self.seq))
        if self.received_at.tzinfo is None:
            raise EnvelopeError("received_at must carry a time zone", field="received_at")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; `Envelope.from_dict` reads it back."""
        return {
            "schema": self.schema,
            "id": self.id,
            "device_id": self.device_id,
            "kind": self.kind.value,
            "seq": self.seq,
            "device_time": self.device_time.isoformat() if self.device_time else None,
            "received_at": self.received_at.isoformat(),
            "transport": self.transport,
            "protocol": self.protocol,
            "payload": dict(self.payload),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> Envelope:
        """Validate and build an envelope from `to_dict()` output."""
        if type(data) is not dict and not isinstance(data, Mapping):
            raise EnvelopeError("an envelope must be a mapping")
        get: Callable[[str], Any] = data.get  # each value is checked below or in __post_init__
        schema = get("schema")
        if schema != SCHEMA_VERSION:
            raise EnvelopeError(f"unsupported envelope schema {schema!r}", field="schema")
        ident, transport, protocol = get("id"), get("transport"), get("protocol")
        for name, value in (("id", ident), ("transport", transport), ("protocol", protocol)):
            if not isinstance(value, str) or not value:
                raise EnvelopeError(f"{name} must be a non-empty string", field=name)
        received_at = _utc_from(get("received_at"), "received_at")
        if received_at is None:
            raise EnvelopeError("received_at is required", field="received_at")
        seq = get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            raise EnvelopeError("seq must be an integer or null", field="seq")
        return cls(
            id=ident,
            device_id=get("device_id"),
            kind=get("kind"),
            seq=seq,
            device_time=_utc_from(get("device_time"), "device_time"),
            received_at=received_at,
            transport=transport,
            protocol=protocol,
            payload=get("payload"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise EnvelopeError(f"envelope is not JSON: {exc}") from exc
        except RecursionError:
            raise PayloadTooDeep("envelope is nested too deeply to parse") from None
        return cls.from_dict(data)
