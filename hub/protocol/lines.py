"""The lines protocol: newline-delimited UTF-8 text, for legacy devices.

Layer: core; imports only `hub.errors`, `hub.payloads` and `hub.protocol`. Sans-IO: this module
must not import sockets or asyncio.

It carries the same events as the native protocol under different framing,
one message per line, which is what proves the codec plug-in interface. The
role rules, NAK reason codes and JSON conventions are those of
`hub.protocol.rules`, shared with the native codec, and the receive buffer is
`hub.protocol.buffer`'s; the format is specified in docs/protocol.md, "The
lines protocol".
"""

from __future__ import annotations

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

__all__ = ["LinesCodec"]

# Longest decimal a field may have: 2**64 - 1 has 20 digits.
_MAX_DIGITS: Final = 20


def _malformed(message: str, seq: int) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=NakReason.MALFORMED, seq=seq)


def _uint(token: str, maximum: int, what: str, seq: int) -> int:
    # int() would also take signs, underscores, spaces and non-ASCII digits.
    if not (token.isascii() and token.isdigit() and len(token) <= _MAX_DIGITS):
        raise _malformed(f"{what} must be a decimal integer, not {token[:32]!r}", seq)
    value = int(token)
    if value > maximum:
        raise _malformed(f"{what} exceeds {maximum}", seq)
    return value


def _seq(token: str) -> int:
    return _uint(token, MAX_UINT32, "seq", 0)


def _guess_seq(rest: str) -> int:
    """The seq a refused line seems to carry, for the error (and so the NAK); 0 if none."""
    token = rest.partition(" ")[0]
    if token.isascii() and token.isdigit() and len(token) <= 10:
        value = int(token)
        if value <= MAX_UINT32:
            return value
    return 0


def _parse_hello(rest: str) -> Hello:
    fields = rest.split(" ")
    if len(fields) not in (2, 3):
        raise _malformed("HELLO takes <device_id> <credential> [<boot_id>]", 0)
    device_id, credential = fields[0], fields[1]
    if not 1 <= len(device_id.encode("utf-8")) <= MAX_DEVICE_ID_BYTES:
        raise _malformed(f"HELLO device id must be 1..{MAX_DEVICE_ID_BYTES} bytes", 0)
    if not 1 <= len(credential.encode("utf-8")) <= MAX_CREDENTIAL_BYTES:
        raise _malformed(f"HELLO credential must be 1..{MAX_CREDENTIAL_BYTES} bytes", 0)
    boot_id = _uint(fields[2], MAX_UINT32, "HELLO boot_id", 0) if len(fields) == 3 else 0
    return Hello(device_id, credential, boot_id, 0)


def _data_parser(
    cls: type[Telemetry] | type[DeviceEvent] | type[StateReport], verb: str
) -> Callable[[str], Event]:
    def parse(rest: str) -> Event:
        fields = rest.split(" ", 2)
        if len(fields) != 3:
            raise _malformed(f"{verb} takes <seq> <device_time_ms> <json>", 0)
        seq = _seq(fields[0])
        device_time_ms = _uint(fields[1], MAX_UINT64, "device_time_ms", seq)
        return cls(seq, decode_json_object(fields[2], verb, seq), device_time_ms)

    return parse


def _seq_parser(cls: type[Ack] | type[Ping] | type[Pong]) -> Callable[[str], Event]:
    def parse(rest: str) -> Event:
        return cls(_seq(rest))

    return parse


def _parse_nak(rest: str) -> Nak:
    fields = rest.split(" ", 2)
    if len(fields) < 2:
        raise _malformed("NAK takes <seq> <reason> [<message>]", 0)
    seq = _seq(fields[0])
    reason = nak_reason_from_wire(_uint(fields[1], 255, "NAK reason", seq), seq)
    return Nak(seq, reason, fields[2] if len(fields) == 3 else "")


def _parse_command(rest: str) -> Command:
    seq_token, _, text = rest.partition(" ")
    seq = _seq(seq_token)
    return command_from_json(decode_json_object(text, "C", seq), seq)


def _parse_command_result(rest: str) -> CommandResult:
    seq_token, _, text = rest.partition(" ")
    seq = _seq(seq_token)
    return command_result_from_json(decode_json_object(text, "R", seq), seq)


#: Verb -> (the event it carries, the parser of the rest of the line).
_PARSERS: Final[dict[str, tuple[type[Event], Callable[[str], Event]]]] = {
    "HELLO": (Hello, _parse_hello),
    "T": (Telemetry, _data_parser(Telemetry, "T")),
    "E": (DeviceEvent, _data_parser(DeviceEvent, "E")),
    "S": (StateReport, _data_parser(StateReport, "S")),
    "ACK": (Ack, _seq_parser(Ack)),
    "NAK": (Nak, _parse_nak),
    "PING": (Ping, _seq_parser(Ping)),
    "PONG": (Pong, _seq_parser(Pong)),
    "C": (Command, _parse_command),
    "R": (CommandResult, _parse_command_result),
}


def _token(value: object, what: str, max_bytes: int) -> str:
    """A HELLO field: non-empty, no space or line break, so the line splits back."""
    raw = encode_text(value, what, 1, max_bytes)
    text = raw.decode("utf-8")
    if " " in text or "\n" in text or "\r" in text:
        raise LocalProtocolError(
            f"{what} must not contain a space or a line break in the lines protocol",
            code=NakReason.MALFORMED,
        )
    return text


class LinesCodec(ReceiveBuffer):
    """The lines protocol for one connection, in the hub or the device role.

    `max_frame_bytes` bounds a line, its `\\n` (and `\\r`) included; a longer
    line is refused with TOO_LARGE as soon as that many bytes are buffered
    without a newline; JSON nested deeper than `max_payload_depth` is refused
    with BAD_PAYLOAD (docs/protocol.md, "Limits").
    """

    name: ClassVar[str] = "lines"

    __slots__ = ("_state", "max_payload_depth")

    def __init__(
        self,
        role: Role,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_payload_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if max_frame_bytes < MIN_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be at least {MIN_FRAME_BYTES}")
        if max_payload_depth < 1:
            raise ValueError("max_payload_depth must be at least 1")
        super().__init__(max_frame_bytes)
        self.max_payload_depth = max_payload_depth
        self._state = ConnectionState(role)

    @property
    def role(self) -> Role:
        return self._state.role

    # -- receiving (receive_data and next_event: ReceiveBuffer) -------------

    def _next_event(self) -> Event | NeedData:
        buf = self._buf
        limit = self.max_frame_bytes
        while True:
            pos = self._pos
            newline = buf.find(b"\n", max(self._scan, pos), pos + limit)
            if newline < 0:
                if len(buf) - pos >= limit:
                    raise RemoteProtocolError(
                        f"line longer than {limit} bytes", code=NakReason.TOO_LARGE, seq=0
                    )
                self._scan = len(buf)
                if self._eof:
                    if len(buf) > pos:
                        raise _malformed("connection closed mid-line", 0)
                    return ConnectionClosed()
                return NEED_DATA
            self._pos = newline + 1
            end = newline - 1 if newline > pos and buf[newline - 1] == 0x0D else newline
            if end > pos:
                return self._parse_line(buf[pos:end])
            # docs/protocol.md, "The lines protocol": empty lines are ignored.

    def _parse_line(self, raw: bytearray) -> Event:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                "line is not UTF-8", code=NakReason.BAD_PAYLOAD, seq=0
            ) from None
        verb, _, rest = line.partition(" ")
        if "\r" in line:
            raise _malformed("carriage return inside a line", _guess_seq(rest))
        entry = _PARSERS.get(verb)
        if entry is None:
            raise RemoteProtocolError(
                f"unknown message {verb[:32]!r}", code=NakReason.UNKNOWN_TYPE, seq=_guess_seq(rest)
            )
        kind, parse = entry
        seq = 0 if kind is Hello else _guess_seq(rest)
        self._state.received(kind, seq)
        try:
            event = parse(rest)
            check_event_depth(event, rest, self.max_payload_depth)
        except RemoteProtocolError as exc:
            # A line refused for its shape still names its seq, for the NAK.
            exc.seq = exc.seq or seq
            raise
        return event

    # -- sending -----------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """One line for `event`, `\\n` included; LocalProtocolError as for `NativeCodec.send`."""
        kind = type(event)
        seq = getattr(event, "seq", 0)
        self._state.may_send(kind, seq if isinstance(seq, int) else 0)
        seq = check_uint(seq, MAX_UINT32, f"{kind.__name__}.seq")
        line = self._encode_line(event, seq)
        if len(line) > self.max_frame_bytes:
            raise LocalProtocolError(
                f"line of {len(line)} bytes exceeds {self.max_frame_bytes}",
                code=NakReason.TOO_LARGE,
                seq=seq,
            )
        self._state.sent(kind)
        return line

    @staticmethod
    def _encode_line(event: Event, seq: int) -> bytes:
        match event:
            case Ack():
                return b"ACK %d\n" % seq
            case Telemetry(payload=payload, device_time_ms=ms):
                ms = check_uint(ms, MAX_UINT64, "Telemetry.device_time_ms", seq)
                return b"T %d %d %s\n" % (seq, ms, encode_json_object(payload, "T", seq))
            case DeviceEvent(payload=payload, device_time_ms=ms):
                ms = check_uint(ms, MAX_UINT64, "DeviceEvent.device_time_ms", seq)
                return b"E %d %d %s\n" % (seq, ms, encode_json_object(payload, "E", seq))
            case StateReport(payload=payload, device_time_ms=ms):
                ms = check_uint(ms, MAX_UINT64, "StateReport.device_time_ms", seq)
                return b"S %d %d %s\n" % (seq, ms, encode_json_object(payload, "S", seq))
            case Nak(reason=reason, message=message):
                code = nak_reason_to_wire(reason, seq)
                # The message is a diagnostic for humans, often an exception's
                # text: its line breaks become spaces rather than failing the
                # NAK (docs/protocol.md, "The lines protocol").
                text = encode_text(message, "Nak.message", 0, MAX_UINT64, seq)
                text = text.replace(b"\r\n", b" ").replace(b"\r", b" ").replace(b"\n", b" ")
                if not text:
                    return b"NAK %d %d\n" % (seq, code)
                return b"NAK %d %d %s\n" % (seq, code, text)
            case Ping():
                return b"PING %d\n" % seq
            case Pong():
                return b"PONG %d\n" % seq
            case Hello(device_id=device_id, credential=credential, boot_id=boot_id):
                if seq != 0:
                    raise LocalProtocolError(
                        "a lines HELLO carries no seq; Hello.seq must be 0",
                        code=NakReason.MALFORMED,
                        seq=seq,
                    )
                device_token = _token(device_id, "Hello.device_id", MAX_DEVICE_ID_BYTES)
                credential_token = _token(credential, "Hello.credential", MAX_CREDENTIAL_BYTES)
                boot_id = check_uint(boot_id, MAX_UINT32, "Hello.boot_id")
                return f"HELLO {device_token} {credential_token} {boot_id}\n".encode()
            case Command():
                return b"C %d %s\n" % (seq, command_to_json(event))
            case CommandResult():
                return b"R %d %s\n" % (seq, command_result_to_json(event))
            case _:
                raise LocalProtocolError(
                    f"{type(event).__name__} is not a message", code=NakReason.MALFORMED, seq=seq
                )
