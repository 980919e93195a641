"""Golden test vectors for the device protocols, as Python data, and the
hypothesis strategies the codec tests share.

The bytes are the ones printed in docs/protocol.md, "Golden test vectors" and
"The lines protocol"; the tests check that the document still shows them. They
were computed from the specification with struct and zlib, not by the codecs,
so they catch a codec and its documentation drifting apart together.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import strategies as st

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

DEVICE_TO_HUB = (Role.DEVICE,)
HUB_TO_DEVICE = (Role.HUB,)
EITHER_WAY = (Role.DEVICE, Role.HUB)


@dataclass(frozen=True)
class Vector:
    """One message: the event, which roles may send it, and its exact bytes."""

    name: str
    event: Event
    senders: tuple[Role, ...]
    hex: str

    @property
    def wire(self) -> bytes:
        return bytes.fromhex(self.hex)

    @property
    def receivers(self) -> tuple[Role, ...]:
        return tuple(Role.HUB if role is Role.DEVICE else Role.DEVICE for role in self.senders)


def hexdump(data: bytes) -> str:
    """The dump format of docs/protocol.md: offset, 16 bytes in two groups of 8, ASCII."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{offset:04x}  {left:<23}  {right:<23}  |{text}|")
    return "\n".join(lines)


HELLO = Hello(device_id="sensor-01", credential="s3cret", boot_id=0x1234ABCD, seq=0)

NATIVE_VECTORS: tuple[Vector, ...] = (
    Vector(
        "hello",
        HELLO,
        DEVICE_TO_HUB,
        "484201010000000015000000001234abcd0973656e736f722d3031067333637265745898b885",
    ),
    Vector(
        "hello_no_credential",
        Hello(device_id="dev-2", credential="", boot_id=0, seq=7),
        DEVICE_TO_HUB,
        "48420101000000000b0000000700000000056465762d32001ac307ca",
    ),
    Vector(
        "telemetry",
        Telemetry(seq=1, payload={"temp_c": 21.5, "rh": 40}, device_time_ms=1_700_000_000_000),
        DEVICE_TO_HUB,
        "48420102000000001f000000010000018bcfe568007b2274656d705f63223a32312e352c227268"
        "223a34307d8bd56fb3",
    ),
    Vector(
        "event",
        DeviceEvent(seq=2, payload={"alarm": "door_open"}, device_time_ms=0),
        DEVICE_TO_HUB,
        "48420103000000001d0000000200000000000000007b22616c61726d223a22646f6f725f6f70656e"
        "227ddb4e8c97",
    ),
    Vector(
        "state",
        StateReport(
            seq=3, payload={"fw": "1.2.0", "interval_s": 60}, device_time_ms=1_700_000_000_123
        ),
        DEVICE_TO_HUB,
        "484201040000000026000000030000018bcfe5687b7b226677223a22312e322e30222c22696e7465"
        "7276616c5f73223a36307dd89da5ca",
    ),
    Vector("ack", Ack(seq=1), EITHER_WAY, "4842010500000000000000000164020939"),
    Vector(
        "nak",
        Nak(seq=2, reason=NakReason.BAD_PAYLOAD, message="not a JSON object"),
        EITHER_WAY,
        "48420106000000001200000002086e6f742061204a534f4e206f626a6563741ac4c17a",
    ),
    Vector(
        "nak_empty_message",
        Nak(seq=9, reason=NakReason.OVERLOADED, message=""),
        EITHER_WAY,
        "48420106000000000100000009096ed8e284",
    ),
    Vector("ping", Ping(seq=4), EITHER_WAY, "48420107000000000000000004109d2d8b"),
    Vector("pong", Pong(seq=4), EITHER_WAY, "48420108000000000000000004e1967606"),
    Vector(
        "command",
        Command(seq=100, command_id="c-1", name="reboot", args={"delay_s": 5}),
        HUB_TO_DEVICE,
        "484201090000000031000000647b226964223a22632d31222c226e616d65223a227265626f6f7422"
        "2c2261726773223a7b2264656c61795f73223a357d7d255ede00",
    ),
    Vector(
        "command_result",
        CommandResult(seq=5, command_id="c-1", ok=True, result={"uptime_s": 0}, error=""),
        DEVICE_TO_HUB,
        "4842010a0000000039000000057b226964223a22632d31222c226f6b223a747275652c2272657375"
        "6c74223a7b22757074696d655f73223a307d2c226572726f72223a22227d564e216d",
    ),
    Vector(
        "command_result_error",
        CommandResult(seq=6, command_id="c-2", ok=False, result=None, error="busy"),
        DEVICE_TO_HUB,
        "4842010a0000000034000000067b226964223a22632d32222c226f6b223a66616c73652c22726573"
        "756c74223a6e756c6c2c226572726f72223a2262757379227d11977a9c",
    ),
)

#: The lines protocol: the same events, one line each (docs/protocol.md, "The lines protocol").
LINES_VECTORS: tuple[Vector, ...] = (
    Vector("hello", HELLO, DEVICE_TO_HUB, b"HELLO sensor-01 s3cret 305441741\n".hex()),
    Vector(
        "telemetry",
        NATIVE_VECTORS[2].event,
        DEVICE_TO_HUB,
        b'T 1 1700000000000 {"temp_c":21.5,"rh":40}\n'.hex(),
    ),
    Vector("event", NATIVE_VECTORS[3].event, DEVICE_TO_HUB, b'E 2 0 {"alarm":"door_open"}\n'.hex()),
    Vector(
        "state",
        NATIVE_VECTORS[4].event,
        DEVICE_TO_HUB,
        b'S 3 1700000000123 {"fw":"1.2.0","interval_s":60}\n'.hex(),
    ),
    Vector("ack", Ack(seq=1), EITHER_WAY, b"ACK 1\n".hex()),
    Vector("nak", NATIVE_VECTORS[6].event, EITHER_WAY, b"NAK 2 8 not a JSON object\n".hex()),
    Vector("nak_empty_message", NATIVE_VECTORS[7].event, EITHER_WAY, b"NAK 9 9\n".hex()),
    Vector("ping", Ping(seq=4), EITHER_WAY, b"PING 4\n".hex()),
    Vector("pong", Pong(seq=4), EITHER_WAY, b"PONG 4\n".hex()),
    Vector(
        "command",
        NATIVE_VECTORS[10].event,
        HUB_TO_DEVICE,
        b'C 100 {"id":"c-1","name":"reboot","args":{"delay_s":5}}\n'.hex(),
    ),
    Vector(
        "command_result",
        NATIVE_VECTORS[11].event,
        DEVICE_TO_HUB,
        b'R 5 {"id":"c-1","ok":true,"result":{"uptime_s":0},"error":""}\n'.hex(),
    ),
    Vector(
        "command_result_error",
        NATIVE_VECTORS[12].event,
        DEVICE_TO_HUB,
        b'R 6 {"id":"c-2","ok":false,"result":null,"error":"busy"}\n'.hex(),
    ),
)

#: Lines a codec accepts that the encoder never writes: (receiving role, line, event).
LINES_ACCEPTED: tuple[tuple[Role, bytes, Event], ...] = (
    (Role.HUB, b"HELLO dev-2 pw\n", Hello(device_id="dev-2", credential="pw", boot_id=0, seq=0)),
    (Role.HUB, b"HELLO dev-2 pw 7\r\n", Hello(device_id="dev-2", credential="pw", boot_id=7)),
    (
        Role.DEVICE,
        b"NAK 3 2 bad credential\r\n",
        Nak(3, NakReason.BAD_CREDENTIAL, "bad credential"),
    ),
    (Role.DEVICE, b"NAK 3 2 \n", Nak(seq=3, reason=NakReason.BAD_CREDENTIAL, message="")),
    (Role.DEVICE, b'C 8 {"id":"x","name":"blink"}\n', Command(8, "x", "blink", {})),
    (Role.HUB, b'R 8 {"id":"x","ok":true}\n', CommandResult(seq=8, command_id="x", ok=True)),
)


# -- hypothesis strategies: valid events for each direction -----------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
seqs = st.integers(min_value=0, max_value=2**32 - 1)
times = st.integers(min_value=0, max_value=2**64 - 1)
nak_reasons = st.sampled_from(list(NakReason))
names = st.text(min_size=1, max_size=16)

either_way_events = st.one_of(
    st.builds(Ack, seqs),
    st.builds(Nak, seqs, nak_reasons, st.text(max_size=40)),
    st.builds(Ping, seqs),
    st.builds(Pong, seqs),
)
device_events = st.one_of(
    st.builds(Telemetry, seqs, json_objects, times),
    st.builds(DeviceEvent, seqs, json_objects, times),
    st.builds(StateReport, seqs, json_objects, times),
    st.builds(CommandResult, seqs, names, st.booleans(), json_values, st.text(max_size=20)),
    either_way_events,
)
hub_events = st.one_of(st.builds(Command, seqs, names, names, json_objects), either_way_events)
hellos = st.builds(
    Hello,
    st.text(min_size=1, max_size=32),  # at most 4 bytes a character: within 128
    st.text(max_size=60),
    st.integers(min_value=0, max_value=2**32 - 1),
    seqs,
)


def random_chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given points; never an empty chunk, which would mean end of stream."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]
