"""The native binary device protocol: length-prefixed frames checked by CRC-32.

Layer: core; imports only `hub.errors`, `hub.payloads` and `hub.protocol`. Sans-IO: this module
must not import sockets or asyncio. Bytes go in through `receive_data()`,
events come out of `next_event()`, and `send()` turns events into bytes; the
caller owns the connection.

The wire format is specified in docs/protocol.md; comments below name its
sections. The rules both built-in codecs share (who may send what, and when;
the JSON conventions; integer ranges) live here too, public, so that
`hub.protocol.lines` applies exactly the same ones.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

from hub.errors import LocalProtocolError, RemoteProtocolError
from hub.payloads import DEFAULT_MAX_PAYLOAD_DEPTH, exceeds_depth, text_exceeds_depth
from hub.protocol.base import DEFAULT_MAX_FRAME_BYTES
from hub.protocol.events import (
    NEED_DATA,
    Ack,
    Command,
    CommandResult,
    ConnectionClosed,
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
    _NeedData,
)

__all__ = [
    "CRC",
    "FRAME_OVERHEAD",
    "HEADER",
    "MAGIC",
    "VERSION",
    "ConnectionState",
    "FrameType",
    "NativeCodec",
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

# docs/protocol.md, "Frame layout".
MAGIC: Final = b"HB"
VERSION: Final = 1
HEADER: Final = struct.Struct(">2sBBBII")  # magic, version, type, flags, length, seq
CRC: Final = struct.Struct(">I")
HEADER_SIZE: Final = HEADER.size
CRC_SIZE: Final = CRC.size
FRAME_OVERHEAD: Final = HEADER_SIZE + CRC_SIZE

#: The smallest `max_frame_bytes` a codec accepts; below it not even a HELLO fits.
MIN_FRAME_BYTES: Final = 64
MAX_DEVICE_ID_BYTES: Final = 128
MAX_CREDENTIAL_BYTES: Final = 255
MAX_UINT32: Final = 0xFFFF_FFFF
MAX_UINT64: Final = 0xFFFF_FFFF_FFFF_FFFF

_HELLO_HEAD: Final = struct.Struct(">IB")  # boot_id, id_len
_U64: Final = struct.Struct(">Q")
_NAK_HEAD: Final = struct.Struct(">B")

# Consumed bytes are dropped from the front of the receive buffer only once
# this many have piled up, so that a burst of small frames costs no copying.
_COMPACT_AT: Final = 64 * 1024


class FrameType(enum.IntEnum):
    """The `type` byte of a frame (docs/protocol.md, "Frame types")."""

    HELLO = 0x01
    TELEMETRY = 0x02
    EVENT = 0x03
    STATE = 0x04
    ACK = 0x05
    NAK = 0x06
    PING = 0x07
    PONG = 0x08
    COMMAND = 0x09
    COMMAND_RESULT = 0x0A


# ---------------------------------------------------------------------------
# Rules shared by every built-in codec
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Payload decoders, one per frame type (docs/protocol.md, "Frame types")
# ---------------------------------------------------------------------------


def _malformed(message: str, seq: int) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=NakReason.MALFORMED, seq=seq)


def _decode_hello(p: bytearray, seq: int) -> Hello:
    size = len(p)
    if size < _HELLO_HEAD.size + 1:
        raise _malformed("HELLO payload is truncated", seq)
    boot_id, id_len = _HELLO_HEAD.unpack_from(p)
    if not 1 <= id_len <= MAX_DEVICE_ID_BYTES:
        raise _malformed(f"HELLO id_len must be 1..{MAX_DEVICE_ID_BYTES}, not {id_len}", seq)
    cred_len_at = _HELLO_HEAD.size + id_len
    if size <= cred_len_at:
        raise _malformed("HELLO payload is truncated", seq)
    cred_end = cred_len_at + 1 + p[cred_len_at]
    if size != cred_end:
        what = "truncated" if size < cred_end else "followed by trailing bytes"
        raise _malformed(f"HELLO payload is {what}", seq)
    try:
        device_id = p[_HELLO_HEAD.size : cred_len_at].decode("utf-8")
        credential = p[cred_len_at + 1 :].decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(
            "HELLO device id or credential is not UTF-8", code=NakReason.BAD_PAYLOAD, seq=seq
        ) from None
    return Hello(device_id, credential, boot_id, seq)


def _data_decoder(
    cls: type[Telemetry] | type[DeviceEvent] | type[StateReport], what: str
) -> Callable[[bytearray, int], Event]:
    def decode(p: bytearray, seq: int) -> Event:
        if len(p) < _U64.size:
            raise _malformed(f"{what} payload is shorter than its device_time_ms", seq)
        (device_time_ms,) = _U64.unpack_from(p)
        return cls(seq, decode_json_object(p[_U64.size :], what, seq), device_time_ms)

    return decode


def _empty_decoder(cls: type[Ack] | type[Ping] | type[Pong]) -> Callable[[bytearray, int], Event]:
    def decode(p: bytearray, seq: int) -> Event:
        if p:
            raise _malformed(f"{cls.__name__.upper()} payload must be empty", seq)
        return cls(seq)

    return decode


def _decode_nak(p: bytearray, seq: int) -> Nak:
    if not p:
        raise _malformed("NAK payload has no reason", seq)
    reason = nak_reason_from_wire(p[0], seq)
    try:
        message = p[_NAK_HEAD.size :].decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(
            "NAK message is not UTF-8", code=NakReason.BAD_PAYLOAD, seq=seq
        ) from None
    return Nak(seq, reason, message)


def _decode_command(p: bytearray, seq: int) -> Command:
    return command_from_json(decode_json_object(p, "COMMAND", seq), seq)


def _decode_command_result(p: bytearray, seq: int) -> CommandResult:
    return command_result_from_json(decode_json_object(p, "COMMAND_RESULT", seq), seq)


_Decoder = Callable[[bytearray, int], Event]

#: Frame type -> (the event it carries, its payload decoder).
_DECODERS: Final[dict[int, tuple[type[Event], _Decoder]]] = {
    FrameType.HELLO: (Hello, _decode_hello),
    FrameType.TELEMETRY: (Telemetry, _data_decoder(Telemetry, "TELEMETRY")),
    FrameType.EVENT: (DeviceEvent, _data_decoder(DeviceEvent, "EVENT")),
    FrameType.STATE: (StateReport, _data_decoder(StateReport, "STATE")),
    FrameType.ACK: (Ack, _empty_decoder(Ack)),
    FrameType.NAK: (Nak, _decode_nak),
    FrameType.PING: (Ping, _empty_decoder(Ping)),
    FrameType.PONG: (Pong, _empty_decoder(Pong)),
    FrameType.COMMAND: (Command, _decode_command),
    FrameType.COMMAND_RESULT: (CommandResult, _decode_command_result),
}


# ---------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------


class NativeCodec:
    """The native protocol for one connection, in the hub or the device role.

    `max_frame_bytes` bounds a whole frame, header and CRC included, both
    ways. A frame whose header announces more is refused with TOO_LARGE
    before its payload is buffered; JSON nested deeper than
    `max_payload_depth` is refused with BAD_PAYLOAD (docs/protocol.md, "Limits").
    """

    name: ClassVar[str] = "native"

    __slots__ = (
        "_buf",
        "_eof",
        "_error",
        "_max_payload",
        "_pos",
        "_state",
        "max_frame_bytes",
        "max_payload_depth",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if not MIN_FRAME_BYTES <= max_frame_bytes <= FRAME_OVERHEAD + MAX_UINT32:
            raise ValueError(
                f"max_frame_bytes must be {MIN_FRAME_BYTES}..{FRAME_OVERHEAD + MAX_UINT32}"
            )
        if max_payload_depth < 1:
            raise ValueError("max_payload_depth must be at least 1")
        self.max_frame_bytes = max_frame_bytes
        self.max_payload_depth = max_payload_depth
        self._max_payload = max_frame_bytes - FRAME_OVERHEAD
        self._state = ConnectionState(role)
        # Received bytes; everything before `_pos` has been consumed.
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def role(self) -> Role:
        return self._state.role

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; `b""` signals end of stream (docs/protocol.md, "End of stream").

        Non-empty data after end of stream is the caller's bug: LocalProtocolError.
        After a RemoteProtocolError the codec is dead and ignores further data.
        """
        if self._error is not None:
            return
        if self._eof:
            if data:
                raise LocalProtocolError(
                    "data received after end of stream", code=NakReason.INTERNAL
                )
            return
        if not data:
            self._eof = True
            return
        pos = self._pos
        if pos:
            if pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif pos >= _COMPACT_AT:
                del self._buf[:pos]
                self._pos = 0
        self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next event, `NEED_DATA`, or `ConnectionClosed()` after end of stream.

        Raises RemoteProtocolError on bad input, and the same error again on
        every later call (docs/protocol.md, "Errors").
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event | _NeedData:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            if not avail:
                return ConnectionClosed() if self._eof else NEED_DATA
            # Refuse a peer speaking another protocol at once rather than
            # waiting for a header's worth of bytes that may never come.
            if buf[pos : pos + 2] != MAGIC[:avail]:
                raise _malformed("bad magic: not a native protocol frame", 0)
            if self._eof:
                raise _malformed("connection closed mid-frame", 0)
            return NEED_DATA

        # docs/protocol.md, "Receiving": the header is checked before the body.
        magic, version, ftype, flags, length, seq = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise _malformed("bad magic: not a native protocol frame", 0)
        if version != VERSION:
            # Another version may lay out the rest of the header differently,
            # so its seq is not trusted.
            raise RemoteProtocolError(
                f"protocol version {version} is not supported (only {VERSION})",
                code=NakReason.UNSUPPORTED_VERSION,
                seq=0,
            )
        if flags:
            raise _malformed(f"flags must be 0, not {flags:#04x}", seq)
        if length > self._max_payload:
            raise RemoteProtocolError(
                f"frame of {FRAME_OVERHEAD + length} bytes exceeds {self.max_frame_bytes}",
                code=NakReason.TOO_LARGE,
                seq=seq,
            )
        body_end = pos + HEADER_SIZE + length
        frame_end = body_end + CRC_SIZE
        if len(buf) < frame_end:
            if self._eof:
                raise _malformed("connection closed mid-frame", seq)
            return NEED_DATA

        (crc,) = CRC.unpack_from(buf, body_end)
        if zlib.crc32(buf[pos:body_end]) != crc:
            raise RemoteProtocolError("CRC mismatch", code=NakReason.BAD_CRC, seq=seq)
        entry = _DECODERS.get(ftype)
        if entry is None:
            raise RemoteProtocolError(
                f"unknown frame type {ftype:#04x}", code=NakReason.UNKNOWN_TYPE, seq=seq
            )
        kind, decode = entry
        self._state.received(kind, seq)
        self._pos = frame_end
        body = buf[pos + HEADER_SIZE : body_end]
        event = decode(body, seq)
        check_event_depth(event, body, self.max_payload_depth)
        return event

    # -- sending -----------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """One complete frame for `event`; LocalProtocolError if our role may not send it
        now or it does not fit the format. Sending stays possible after a receive
        error, so that the caller can NAK the offending frame."""
        kind = type(event)
        seq = getattr(event, "seq", 0)
        self._state.may_send(kind, seq if isinstance(seq, int) else 0)
        seq = check_uint(seq, MAX_UINT32, f"{kind.__name__}.seq")
        ftype, payload = self._encode_payload(event, seq)
        if len(payload) > self._max_payload:
            raise LocalProtocolError(
                f"frame of {FRAME_OVERHEAD + len(payload)} bytes exceeds {self.max_frame_bytes}",
                code=NakReason.TOO_LARGE,
                seq=seq,
            )
        body = HEADER.pack(MAGIC, VERSION, ftype, 0, len(payload), seq) + payload
        self._state.sent(kind)
        return body + CRC.pack(zlib.crc32(body))

    @staticmethod
    def _encode_payload(event: Event, seq: int) -> tuple[int, bytes]:
        # Ordered by how often each is sent: the hub mostly acknowledges.
        match event:
            case Ack():
                return FrameType.ACK, b""
            case Telemetry(payload=payload, device_time_ms=ms):
                ms = check_uint(ms, MAX_UINT64, "Telemetry.device_time_ms", seq)
                return FrameType.TELEMETRY, _U64.pack(ms) + encode_json_object(
                    payload, "TELEMETRY", seq
                )
            case DeviceEvent(payload=payload, device_time_ms=ms):
                ms = check_uint(ms, MAX_UINT64, "DeviceEvent.device_time_ms", seq)
                return FrameType.EVENT, _U64.pack(ms) + encode_json_object(payload, "EVENT", seq)
            case StateReport(payload=payload, device_time_ms=ms):
                ms = check_uint(ms, MAX_UINT64, "StateReport.device_time_ms", seq)
                return FrameType.STATE, _U64.pack(ms) + encode_json_object(payload, "STATE", seq)
            case Nak(reason=reason, message=message):
                code = nak_reason_to_wire(reason, seq)
                text = encode_text(message, "Nak.message", 0, MAX_UINT32, seq)
                return FrameType.NAK, _NAK_HEAD.pack(code) + text
            case Ping():
                return FrameType.PING, b""
            case Pong():
                return FrameType.PONG, b""
            case Hello(device_id=device_id, credential=credential, boot_id=boot_id):
                raw_id = encode_text(device_id, "Hello.device_id", 1, MAX_DEVICE_ID_BYTES, seq)
                raw_cred = encode_text(credential, "Hello.credential", 0, MAX_CREDENTIAL_BYTES, seq)
                boot_id = check_uint(boot_id, MAX_UINT32, "Hello.boot_id", seq)
                head = _HELLO_HEAD.pack(boot_id, len(raw_id))
                return FrameType.HELLO, head + raw_id + bytes((len(raw_cred),)) + raw_cred
            case Command():
                return FrameType.COMMAND, command_to_json(event)
            case CommandResult():
                return FrameType.COMMAND_RESULT, command_result_to_json(event)
            case _:
                # ConnectionClosed: the caller closes the socket instead.
                raise LocalProtocolError(
                    f"{type(event).__name__} is not a frame", code=NakReason.MALFORMED, seq=seq
                )
