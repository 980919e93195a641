"""Protocol events shared by every codec.

Layer: core; imports nothing from the project.

A codec turns bytes into these events and these events into bytes. They are
the protocol's vocabulary independent of framing, so the TCP bridge and the
simulator work with any registered codec.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final


class Role(enum.Enum):
    """Which end of the connection a codec instance plays."""

    HUB = "hub"
    DEVICE = "device"


class NakReason(enum.IntEnum):
    """Reason codes carried by NAK frames (docs/protocol.md, "NAK reasons")."""

    UNKNOWN_DEVICE = 1
    BAD_CREDENTIAL = 2
    MALFORMED = 3
    TOO_LARGE = 4
    BAD_CRC = 5
    NOT_AUTHENTICATED = 6
    UNSUPPORTED_VERSION = 7
    BAD_PAYLOAD = 8
    OVERLOADED = 9
    INTERNAL = 10
    UNKNOWN_TYPE = 11


class NeedData:
    """The type of `NEED_DATA`: the codec needs more bytes before it can return an event.

    h11's pattern: `next_event()` returns the one instance, `NEED_DATA`, and the
    caller tests `event is NEED_DATA` (or `isinstance(event, NeedData)` where a
    type checker must narrow the union), then feeds more bytes.
    """

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The one `NeedData` instance, returned by `next_event()` when a frame is incomplete.
NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Hello:
    """Device -> hub, first frame: names the device and proves its credential.

    `boot_id` is chosen by the device at power-up; with `seq` it makes message
    ids stable across retransmissions but distinct across reboots.
    """

    device_id: str
    credential: str
    boot_id: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Device -> hub: measurements. `device_time_ms` is Unix ms, 0 when unknown."""

    seq: int
    payload: Mapping[str, Any]
    device_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Device -> hub: something happened (an alarm, a button, a reboot)."""

    seq: int
    payload: Mapping[str, Any]
    device_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class StateReport:
    """Device -> hub: the device's own view of its state (settings, firmware...)."""

    seq: int
    payload: Mapping[str, Any]
    device_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """Either way: frame `seq` was accepted (hub -> device: and is durable)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Nak:
    """Either way: the frame with sequence number `seq` was refused, with a reason."""

    seq: int
    reason: NakReason
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


@dataclass(frozen=True, slots=True)
class Command:
    """Hub -> device: run `name` with `args`; the device answers with a CommandResult."""

    seq: int
    command_id: str
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Device -> hub: the answer to Command `command_id`; `ok` False carries `error`."""

    seq: int
    command_id: str
    ok: bool
    result: Any = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream (`receive_data(b"")`)."""


Event = (
    Hello
    | Telemetry
    | DeviceEvent
    | StateReport
    | Ack
    | Nak
    | Ping
    | Pong
    | Command
    | CommandResult
    | ConnectionClosed
)

#: Events that carry device data and become envelopes.
DataEvent = Telemetry | DeviceEvent | StateReport
