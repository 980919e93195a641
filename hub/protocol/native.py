"""The native binary device protocol: length-prefixed frames checked by CRC-32.

Layer: core; imports only `hub.errors`, `hub.payloads` and `hub.protocol`. Sans-IO: this module
must not import sockets or asyncio. Bytes go in through `receive_data()`,
events come out of `next_event()`, and `send()` turns events into bytes; the
caller owns the connection.

The wire format is specified in docs/protocol.md; comments below name its
sections. This module owns the framing only: the rules both built-in codecs
share (who may send what, and when; the JSON conventions; integer ranges) are
in `hub.protocol.rules`, the receive buffer in `hub.protocol.buffer`.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable
from typing import ClassVar, Final

from hub.errors import LocalProtocolError, RemoteProtocolError
from hub.payloads import DEFAULT_MAX_PAYLOAD_DEPTH
from hub.protocol.buffer import ReceiveBuffer
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
    NeedData,
    Ping,
    Pong,
    Role,
    StateReport,
    Telemetry,
)
from hub.protocol.rules import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_CREDENTIAL_BYTES,
    MAX_DEVICE_ID_BYTES,
    MAX_UINT32,
    MAX_UINT64,
    MIN_FRAME_BYTES,
    ConnectionState,
    check_event_depth,
    check_uint,
    command_from_json,
    command_result_from_json,
    command_result_to_json,
    command_to_json,
    decode_json_object,
    encode_json_object,
    encode_text,
    nak_reason_from_wire,
    nak_reason_to_wire,
)

__all__ = [
    "CRC",
    "FRAME_OVERHEAD",
    "HEADER",
    "MAGIC",
    "VERSION",
    "FrameType",
    "NativeCodec",
]

# docs/protocol.md, "Frame layout".
MAGIC: Final = b"HB"
VERSION: Final = 1
HEADER: Final = struct.Struct(">2sBBBII")  # magic, version, type, flags, length, seq
CRC: Final = struct.Struct(">I")
HEADER_SIZE: Final = HEADER.size
CRC_SIZE: Final = CRC.size
FRAME_OVERHEAD: Final = HEADER_SIZE + CRC_SIZE

_HELLO_HEAD: Final = struct.Struct(">IB")  # boot_id, id_len
_U64: Final = struct.Struct(">Q")
_NAK_HEAD: Final = struct.Struct(">B")


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


class NativeCodec(ReceiveBuffer):
    """The native protocol for one connection, in the hub or the device role.

    `max_frame_bytes` bounds a whole frame, header and CRC included, both
    ways. A frame whose header announces more is refused with TOO_LARGE
    before its payload is buffered; JSON nested deeper than
    `max_payload_depth` is refused with BAD_PAYLOAD (docs/protocol.md, "Limits").
    """

    name: ClassVar[str] = "native"

    __slots__ = ("_max_payload", "_state", "max_payload_depth")

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
        super().__init__(max_frame_bytes)
        self.max_payload_depth = max_payload_depth
        self._max_payload = max_frame_bytes - FRAME_OVERHEAD
        self._state = ConnectionState(role)

    @property
    def role(self) -> Role:
        return self._state.role

    # -- receiving (receive_data and next_event: ReceiveBuffer) -------------

    def _next_event(self) -> Event | NeedData:
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
