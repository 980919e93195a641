"""Hostile peers for the reliability suite: bad input at volume, from a process of its own.

    python -m tests.reliability.hostile_peers '<attack as JSON>'

prints one JSON line: how many connections were made, how many the hub
closed, and how long the slowest close took. It runs apart from the test
process so that its own CPU use cannot stall the healthy devices the test
measures (they run on the test's event loop thread).

An attack is `{"kind": ..., "port": ..., "count": N, "lanes": L, ...}`:
`count` connections over `lanes` concurrent lanes, each lane one connection
after another. Each connection follows the kind's steps (send bytes, sleep,
read, half-close) and then waits up to `close_within_s` for the hub to close
it. The kinds are listed in `KINDS`; each names the reject it should cause.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hub.protocol.discovery import load_codec
from hub.protocol.events import Hello, Role
from hub.protocol.native import HEADER, MAGIC, VERSION

Step = tuple[str, Any]  # ("send", bytes) | ("sleep", s) | ("read", n) | ("eof", None)


@dataclass(frozen=True)
class Attack:
    kind: str
    port: int
    count: int
    lanes: int = 50
    close_within_s: float = 10.0
    seed: int = 13
    device: str = ""
    credential: str = ""
    #: For MQTT attacks after an accepted CONNECT: one device per lane.
    devices: tuple[tuple[str, str], ...] = ()
    #: Seconds between the bytes of a slow sender.
    byte_interval_s: float = 2.0
    #: Lanes started per second (0: all at once). 2,000 sockets opened over a
    #: second are still 2,000 open at once, without one instant of 2,000 accepts.
    ramp_per_s: float = 0.0


# -- native frames ------------------------------------------------------------------------


def hello(device: str, credential: str) -> bytes:
    return load_codec("native")(Role.DEVICE).send(
        Hello(device_id=device, credential=credential, boot_id=1)
    )


def oversize_header() -> bytes:
    """A HELLO header announcing a 2 GB payload (refused from the header, TOO_LARGE)."""
    header = HEADER.pack(MAGIC, VERSION, 0x01, 0, 0x7FFFFFFF, 1)
    return header + b"\0" * 16


def bad_crc(frame: bytes) -> bytes:
    crc = zlib.crc32(frame[:-4]) ^ 0xFFFFFFFF
    return frame[:-4] + crc.to_bytes(4, "big")


# -- MQTT packets ---------------------------------------------------------------------------


def _text(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def _packet(first_byte: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([first_byte]) + bytes(encoded) + body


def connect(client_id: str, creds: tuple[str, str] | None = None, *, flags: int = 0x02) -> bytes:
    payload = _text(client_id)
    if creds is not None:
        flags |= 0xC0
        payload += _text(creds[0]) + _text(creds[1])
    return _packet(0x10, _text("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + payload)


def publish(topic: str, payload: bytes, qos: int = 0) -> bytes:
    body = _text(topic) + (b"\x00\x01" if qos else b"") + payload
    return _packet(0x30 | (qos << 1), body)


# -- the kinds -------------------------------------------------------------------------------

Steps = Callable[[Attack, int, random.Random], list[Step]]


def _slow(data: bytes, interval_s: float) -> list[Step]:
    steps: list[Step] = []
    for byte in data:
        steps += [("send", bytes([byte])), ("sleep", interval_s)]
    return steps


def _lane_device(attack: Attack, i: int) -> tuple[str, str]:
    return attack.devices[i % len(attack.devices)]


KINDS: dict[str, Steps] = {
    # native TCP
    "tcp_random": lambda a, i, rng: [("send", rng.randbytes(64))],
    "tcp_truncated": lambda a, i, rng: [
        ("send", hello(a.device, a.credential)[:10]),
        ("eof", None),
    ],
    "tcp_oversize": lambda a, i, rng: [("send", oversize_header())],
    "tcp_bad_crc": lambda a, i, rng: [("send", bad_crc(hello(a.device, a.credential)))],
    "tcp_wrong_credential": lambda a, i, rng: [("send", hello(a.device, f"wrong-{i}"))],
    "tcp_unknown_device": lambda a, i, rng: [("send", hello(f"nobody-{a.seed}-{i}", "x"))],
    "tcp_silent": lambda a, i, rng: [],
    "tcp_slow": lambda a, i, rng: _slow(hello(a.device, a.credential), a.byte_interval_s),
    # MQTT
    "mqtt_random": lambda a, i, rng: [("send", rng.randbytes(64))],
    "mqtt_truncated": lambda a, i, rng: [("send", connect(f"trunc-{i}", (a.device, "x"))[:9])],
    "mqtt_oversize": lambda a, i, rng: [("send", b"\x10\xff\xff\xff\x7f" + _text("MQTT"))],
    "mqtt_wrong_credential": lambda a, i, rng: [
        ("send", connect(f"wrong-{a.seed}-{i}", (a.device, f"wrong-{i}"))),
        ("read", 4),
    ],
    "mqtt_malformed_connect": lambda a, i, rng: [
        ("send", connect(f"mal-{i}", (a.device, a.credential), flags=0x03))  # reserved flag
    ],
    "mqtt_malformed_packet": lambda a, i, rng: [
        ("send", connect(_lane_device(a, i)[0], _lane_device(a, i))),
        ("read", 4),
        ("send", publish(f"devices/{_lane_device(a, i)[0]}/telemetry", b"{}", qos=3)),
    ],
    "mqtt_deep_topic": lambda a, i, rng: [
        ("send", connect(_lane_device(a, i)[0], _lane_device(a, i))),
        ("read", 4),
        ("send", publish("devices/" + "/".join(["x"] * 2000), b"{}")),
    ],
    "mqtt_silent": lambda a, i, rng: [],
    "mqtt_slow": lambda a, i, rng: _slow(connect(f"slow-{i}", (a.device, "x")), a.byte_interval_s),
}


# -- running one attack ------------------------------------------------------------------------


@dataclass
class Outcome:
    connections: int = 0
    connect_failures: int = 0
    closed_by_hub: int = 0
    slowest_close_s: float = 0.0
    seconds: float = 0.0


async def _one(attack: Attack, i: int, rng: random.Random, outcome: Outcome) -> None:
    steps = KINDS[attack.kind](attack, i, rng)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", attack.port)
    except OSError:
        outcome.connect_failures += 1
        return
    outcome.connections += 1
    started = time.monotonic()
    closed = False
    try:
        for action, value in steps:
            if action == "send":
                writer.write(value)
                await writer.drain()
            elif action == "sleep":
                # The hub may close the connection while the sender dawdles.
                try:
                    if not await asyncio.wait_for(reader.read(4096), value):
                        closed = True
                        break
                except TimeoutError:
                    pass
            elif action == "read":
                await asyncio.wait_for(reader.read(value), attack.close_within_s)
            elif action == "eof":
                writer.write_eof()
        deadline = started + attack.close_within_s
        while not closed and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(4096), deadline - time.monotonic())
            except TimeoutError:
                break
            closed = not data
    except (ConnectionError, TimeoutError, OSError):
        closed = True
    finally:
        writer.transport.abort()
    if closed:
        outcome.closed_by_hub += 1
        outcome.slowest_close_s = max(outcome.slowest_close_s, time.monotonic() - started)


async def run(attack: Attack) -> Outcome:
    outcome = Outcome()
    started = time.monotonic()
    lanes = max(1, min(attack.lanes, attack.count))

    async def lane(first: int) -> None:
        if attack.ramp_per_s:
            await asyncio.sleep(first / attack.ramp_per_s)
        rng = random.Random(attack.seed * 1000 + first)
        for i in range(first, attack.count, lanes):
            await _one(attack, i, rng, outcome)

    await asyncio.gather(*(lane(n) for n in range(lanes)))
    outcome.seconds = time.monotonic() - started
    return outcome


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    spec["devices"] = tuple(tuple(d) for d in spec.get("devices", ()))
    outcome = asyncio.run(run(Attack(**spec)))
    print(json.dumps(outcome.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
