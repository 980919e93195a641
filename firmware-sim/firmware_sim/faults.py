"""Byte-level faults a simulated device can inject into what it sends.

Layer: firmware simulator; imports nothing of the project (standard library
only). The faults are pure functions of the bytes (plus their own counters
and random generator); `firmware_sim.device.Outbox` applies them to a
connection's writes.

A fault, as in pymodbus's test seam, is a callable that takes the bytes of
one write (one TCP frame, one MQTT packet as paho hands it to the socket) and
returns what goes on the wire instead, in order:

- `[data]` unchanged; `[]` drops the write;
- several pieces split it (each piece is a write of its own);
- altered bytes corrupt it;
- a `Delay(seconds)` holds back everything after it, of this write and of
  the following ones (order on the wire is kept, as TCP would).

Ready faults: `SplitRandomly`, `FlipByte`, `DropEvery`, `DelayWrites`, and
`chain` to apply several in turn. `parse_fault("split")`, `"flip:10"`,
`"drop:5"`, `"delay:0.05"` build one from the `firmware-sim --fault` option.

A fault instance keeps its counters across every device that uses it, so
`DropEvery(5)` given to a fleet drops every fifth write of the fleet.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "FAULT_HELP",
    "Delay",
    "DelayWrites",
    "DropEvery",
    "Fault",
    "FlipByte",
    "Piece",
    "SplitRandomly",
    "chain",
    "parse_fault",
]


@dataclass(frozen=True, slots=True)
class Delay:
    """Hold back what follows by `seconds`."""

    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError("a delay must be >= 0 seconds")


Piece = bytes | Delay

#: One write in, what goes on the wire out (see the module doc).
Fault = Callable[[bytes], Sequence[Piece]]


class SplitRandomly:
    """Split each write into 1 to `max_pieces` pieces at random places.

    Harmless to a correct receiver (TCP is a stream): a test that it reassembles.
    """

    def __init__(self, max_pieces: int = 8, *, seed: int | None = None) -> None:
        if max_pieces < 1:
            raise ValueError("max_pieces must be >= 1")
        self.max_pieces = max_pieces
        self._rng = random.Random(seed)

    def __call__(self, data: bytes) -> list[Piece]:
        if len(data) < 2:
            return [data]
        pieces = self._rng.randint(1, min(self.max_pieces, len(data)))
        cuts = sorted(self._rng.sample(range(1, len(data)), pieces - 1))
        bounds = [0, *cuts, len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]


class FlipByte:
    """Invert one byte at a random place in every `every`-th write (the first included)."""

    def __init__(self, every: int = 1, *, seed: int | None = None) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.every = every
        self._rng = random.Random(seed)
        self._count = 0

    def __call__(self, data: bytes) -> list[Piece]:
        self._count += 1
        if not data or (self._count - 1) % self.every:
            return [data]
        at = self._rng.randrange(len(data))
        return [data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]]


class DropEvery:
    """Drop every `n`-th write (the n-th, 2n-th, ...), as a lossy link that TCP cannot see."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self._count = 0

    def __call__(self, data: bytes) -> list[Piece]:
        self._count += 1
        return [] if self._count % self.n == 0 else [data]


class DelayWrites:
    """Delay every write by `seconds` (a slow link; order is kept)."""

    def __init__(self, seconds: float) -> None:
        self._delay = Delay(seconds)

    @property
    def seconds(self) -> float:
        return self._delay.seconds

    def __call__(self, data: bytes) -> list[Piece]:
        return [self._delay, data]


def chain(*faults: Fault) -> Fault:
    """Apply `faults` in turn: each one's pieces go through the next; delays pass along."""

    def apply(data: bytes) -> list[Piece]:
        pieces: list[Piece] = [data]
        for fault in faults:
            pieces = [
                out
                for piece in pieces
                for out in ([piece] if isinstance(piece, Delay) else fault(piece))
            ]
        return pieces

    return apply


#: `--fault` help: the names `parse_fault` knows, with their argument.
FAULT_HELP = (
    "split[:N] splits each write into up to N random pieces (default 8); "
    "flip[:N] inverts one random byte of every N-th write (default 1: every write); "
    "drop:N drops every N-th write; "
    "delay:S delays every write by S seconds"
)


def parse_fault(spec: str, *, seed: int | None = None) -> Fault:
    """Build a ready fault from `name[:argument]` (see `FAULT_HELP`); ValueError if unknown."""
    name, _, arg = spec.strip().partition(":")
    try:
        match name:
            case "split":
                return SplitRandomly(int(arg) if arg else 8, seed=seed)
            case "flip":
                return FlipByte(int(arg) if arg else 1, seed=seed)
            case "drop" if arg:
                return DropEvery(int(arg))
            case "delay" if arg:
                return DelayWrites(float(arg))
    except ValueError as exc:
        raise ValueError(f"fault {spec!r}: {exc}") from None
    raise ValueError(f"unknown fault {spec!r}; one of: {FAULT_HELP}")
