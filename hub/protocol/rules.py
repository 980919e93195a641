"""The rules both built-in codecs share: who may send what and when, limits, JSON, NAK codes.

Layer: core; imports only `hub.errors`, `hub.payloads` and `hub.protocol.events`.
Sans-IO: no sockets, no asyncio.

`hub.protocol.native` and `hub.protocol.lines` frame the same events
differently; everything that is not framing lives here, once, so that both
apply exactly the same rules: the handshake state machine (docs/protocol.md,
"Handshake and state machine"), integer and text ranges, the JSON conventions
(docs/protocol.md, "JSON"), the depth limit (docs/protocol.md, "Limits"), the
JSON bodies of COMMAND and COMMAND_RESULT, and the NAK reason table
(docs/protocol.md, "NAK reasons"). A plug-in codec may use them too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from hub.errors import LocalProtocolError, RemoteProtocolError
from hub.payloads import exceeds_depth, text_exceeds_depth
from hub.protocol.events import (
    Ack,
    Command,
    CommandResult,
    DeviceEvent,
    Event,
    Hello,
    Nak,
    NakReason,
    Ping,
    Pong,
    Role,
    StateReport,
    Telemetry,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_CREDENTIAL_BYTES",
    "MAX_DEVICE_ID_BYTES",
    "MAX_UINT32",
    "MAX_UINT64",
    "MIN_FRAME_BYTES",
    "ConnectionState",
    "check_event_depth",
    "check_uint",
    "command_from_json",
    "command_result_from_json",
    "command_result_to_json",
    "command_to_json",
    "decode_json_object",
    "encode_json",
    "encode_json_object",
    "encode_text",
    "nak_reason_from_wire",
    "nak_reason_to_wire",
]

#: A frame's (or line's) size limit when the caller names none (docs/protocol.md, "Limits").
DEFAULT_MAX_FRAME_BYTES: Final = 65536
#: The smallest `max_frame_bytes` a codec accepts; below it not even a HELLO fits.
MIN_FRAME_BYTES: Final = 64
MAX_DEVICE_ID_BYTES: Final = 128
MAX_CREDENTIAL_BYTES: Final = 255
MAX_UINT32: Final = 0xFFFF_FFFF
MAX_UINT64: Final = 0xFFFF_FFFF_FFFF_FFFF

_DEVICE_DATA: Final[frozenset[type[Event]]] = frozenset(
    {Telemetry, DeviceEvent, StateReport, CommandResult}
)
_EITHER_WAY: Final[frozenset[type[Event]]] = frozenset({Ack, Nak, Ping, Pong})
_HUB_RECEIVES: Final = _DEVICE_DATA | _EITHER_WAY
_HUB_SENDS: Final = _EITHER_WAY | {Command}
_DEVICE_RECEIVES: Final = _EITHER_WAY | {Command}
_DEVICE_SENDS: Final = _DEVICE_DATA | _EITHER_WAY


class ConnectionState:
    """Who may send what, and when: the one place that owns the handshake.

    docs/protocol.md, "Handshake and state machine". The only state is whether
    the HELLO has gone by: a hub must receive it first and once, a device must
    send it first and once. Whether the credential was right is not the
    codec's business; the caller answers the HELLO with ACK or NAK.
    """

    __slots__ = ("_hello_done", "role")

    def __init__(self, role: Role) -> None:
        self.role = role
        self._hello_done = False

    @property
    def hello_done(self) -> bool:
        """True once the HELLO was received (hub role) or sent (device role)."""
        return self._hello_done

    def received(self, kind: type[Event], seq: int) -> None:
        """Check that the peer may send `kind` now, and record it; RemoteProtocolError if not."""
        if self.role is Role.HUB:
            if not self._hello_done:
                if kind is not Hello:
                    raise RemoteProtocolError(
                        f"{kind.__name__} before HELLO", code=NakReason.NOT_AUTHENTICATED, seq=seq
                    )
                self._hello_done = True
            elif kind not in _HUB_RECEIVES:
                what = "a second HELLO" if kind is Hello else f"{kind.__name__} sent to the hub"
                raise RemoteProtocolError(what, code=NakReason.MALFORMED, seq=seq)
        elif kind not in _DEVICE_RECEIVES:
            raise RemoteProtocolError(
                f"{kind.__name__} sent to a device", code=NakReason.MALFORMED, seq=seq
            )

    def may_send(self, kind: type[Event], seq: int) -> None:
        """Check that our role may send `kind` now; LocalProtocolError if not."""
        if self.role is Role.HUB:
            if kind not in _HUB_SENDS:
                raise LocalProtocolError(
                    f"a hub does not send {kind.__name__}", code=NakReason.MALFORMED, seq=seq
                )
        elif not self._hello_done:
            if kind is not Hello:
                raise LocalProtocolError(
                    f"{kind.__name__} before HELLO", code=NakReason.NOT_AUTHENTICATED, seq=seq
                )
        elif kind not in _DEVICE_SENDS:
            what = "a second HELLO" if kind is Hello else f"a device does not send {kind.__name__}"
            raise LocalProtocolError(what, code=NakReason.MALFORMED, seq=seq)

    def sent(self, kind: type[Event]) -> None:
        """Record that `kind` was encoded (call after `may_send` and a successful encoding)."""
        if kind is Hello:
            self._hello_done = True


def check_uint(value: object, maximum: int, what: str, seq: int = 0) -> int:
    """`value` if it is an int (not a bool) in 0..maximum; LocalProtocolError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise LocalProtocolError(
            f"{what} must be an integer in 0..{maximum}, not {value!r}",
            code=NakReason.MALFORMED,
            seq=seq,
        )
    return value


def encode_text(value: object, what: str, min_bytes: int, max_bytes: int, seq: int = 0) -> bytes:
    """`value` as UTF-8, its length checked; LocalProtocolError otherwise."""
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str", code=NakReason.BAD_PAYLOAD, seq=seq)
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(
            f"{what} is not encodable as UTF-8", code=NakReason.BAD_PAYLOAD, seq=seq
        ) from None
    if not min_bytes <= len(data) <= max_bytes:
        raise LocalProtocolError(
            f"{what} must be {min_bytes}..{max_bytes} bytes of UTF-8, not {len(data)}",
            code=NakReason.MALFORMED,
            seq=seq,
        )
    return data


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON (RFC 8259).
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e999 parses to inf, which JSON cannot carry back out.
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:32]} is out of the range of a double")
    return value


_JSON_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# Compact and ASCII-only: deterministic bytes for the golden vectors, and no
# raw newline can ever appear in the lines protocol (docs/protocol.md, "JSON").
_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def decode_json_object(data: bytes | bytearray | str, what: str, seq: int) -> dict[str, Any]:
    """Strict UTF-8 JSON that must be an object; RemoteProtocolError(BAD_PAYLOAD) otherwise."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        value = _JSON_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and integers of
        # more than 4,300 digits; very deep nesting exhausts the recursion limit
        # before any size limit would help (the depth limit is checked after).
        raise RemoteProtocolError(
            f"{what} payload is not UTF-8 JSON: {exc}", code=NakReason.BAD_PAYLOAD, seq=seq
        ) from None
    if type(value) is not dict:
        raise RemoteProtocolError(
            f"{what} payload is JSON but not an object", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    return value


def encode_json(value: object, what: str, seq: int) -> bytes:
    """Compact, ASCII-only JSON; LocalProtocolError(BAD_PAYLOAD) for values JSON cannot carry."""
    try:
        return _JSON_ENCODER.encode(value).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(
            f"{what} payload is not JSON-serializable: {exc}", code=NakReason.BAD_PAYLOAD, seq=seq
        ) from None


def encode_json_object(value: object, what: str, seq: int) -> bytes:
    """A `Mapping` payload as a compact JSON object."""
    if not isinstance(value, Mapping):
        raise LocalProtocolError(
            f"{what} payload must be a mapping", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    return encode_json(value if type(value) is dict else dict(value), what, seq)


def _json_carried(event: Event) -> object:
    """The JSON document an event carried on the wire, as far as depth goes."""
    if isinstance(event, (Telemetry, DeviceEvent, StateReport)):
        return event.payload
    if isinstance(event, Command):
        return {"args": event.args}
    if isinstance(event, CommandResult):
        return {"result": event.result}
    return None


def check_event_depth(event: Event, raw: bytes | bytearray | str, max_depth: int) -> None:
    """RemoteProtocolError(BAD_PAYLOAD) if the JSON `event` came in as (`raw`) nests
    deeper than `max_depth` (docs/protocol.md, "Limits").

    Counting brackets in `raw` is a sound shortcut: most payloads have fewer
    brackets than the limit, and only the others are measured (iteratively).
    """
    if not text_exceeds_depth(raw, max_depth):
        return
    if exceeds_depth(_json_carried(event), max_depth):
        raise RemoteProtocolError(
            f"payload is nested too deeply (more than {max_depth} levels)",
            code=NakReason.BAD_PAYLOAD,
            seq=getattr(event, "seq", 0),
        )


def _bad_field(what: str, field: str, seq: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what} payload: {field}", code=NakReason.BAD_PAYLOAD, seq=seq)


def command_from_json(obj: dict[str, Any], seq: int) -> Command:
    """A COMMAND's JSON object as an event (docs/protocol.md, "COMMAND")."""
    command_id = obj.get("id")
    name = obj.get("name")
    args = obj.get("args", {})
    if not isinstance(command_id, str) or not command_id:
        raise _bad_field("COMMAND", '"id" must be a non-empty string', seq)
    if not isinstance(name, str) or not name:
        raise _bad_field("COMMAND", '"name" must be a non-empty string', seq)
    if type(args) is not dict:
        raise _bad_field("COMMAND", '"args" must be an object', seq)
    return Command(seq, command_id, name, args)


def command_to_json(event: Command) -> bytes:
    seq = event.seq
    if not isinstance(event.command_id, str) or not event.command_id:
        raise LocalProtocolError(
            "Command.command_id must be a non-empty str", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    if not isinstance(event.name, str) or not event.name:
        raise LocalProtocolError(
            "Command.name must be a non-empty str", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    if not isinstance(event.args, Mapping):
        raise LocalProtocolError(
            "Command.args must be a mapping", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    args = event.args if type(event.args) is dict else dict(event.args)
    return encode_json({"id": event.command_id, "name": event.name, "args": args}, "COMMAND", seq)


def command_result_from_json(obj: dict[str, Any], seq: int) -> CommandResult:
    """A COMMAND_RESULT's JSON object as an event (docs/protocol.md, "COMMAND_RESULT")."""
    command_id = obj.get("id")
    ok = obj.get("ok")
    error = obj.get("error", "")
    if not isinstance(command_id, str) or not command_id:
        raise _bad_field("COMMAND_RESULT", '"id" must be a non-empty string', seq)
    if not isinstance(ok, bool):
        raise _bad_field("COMMAND_RESULT", '"ok" must be true or false', seq)
    if not isinstance(error, str):
        raise _bad_field("COMMAND_RESULT", '"error" must be a string', seq)
    return CommandResult(seq, command_id, ok, obj.get("result"), error)


def command_result_to_json(event: CommandResult) -> bytes:
    seq = event.seq
    if not isinstance(event.command_id, str) or not event.command_id:
        raise LocalProtocolError(
            "CommandResult.command_id must be a non-empty str",
            code=NakReason.BAD_PAYLOAD,
            seq=seq,
        )
    if not isinstance(event.ok, bool):
        raise LocalProtocolError(
            "CommandResult.ok must be a bool", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    if not isinstance(event.error, str):
        raise LocalProtocolError(
            "CommandResult.error must be a str", code=NakReason.BAD_PAYLOAD, seq=seq
        )
    obj = {"id": event.command_id, "ok": event.ok, "result": event.result, "error": event.error}
    return encode_json(obj, "COMMAND_RESULT", seq)


_NAK_REASONS: Final[dict[int, NakReason]] = {reason.value: reason for reason in NakReason}


def nak_reason_from_wire(value: int, seq: int) -> NakReason:
    """A received reason code as a NakReason.

    Values not in the table are MALFORMED, not mapped to INTERNAL: a reason the
    hub does not know is a peer it does not understand (docs/protocol.md, "NAK reasons").
    """
    reason = _NAK_REASONS.get(value)
    if reason is None:
        raise RemoteProtocolError(
            f"NAK reason {value} is not defined", code=NakReason.MALFORMED, seq=seq
        )
    return reason


def nak_reason_to_wire(value: object, seq: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in _NAK_REASONS:
        raise LocalProtocolError(
            f"Nak.reason {value!r} is not a NakReason", code=NakReason.MALFORMED, seq=seq
        )
    return int(value)
