"""Fuzz target `lines`: the lines codec in the hub and the device role.

Layer: tooling (see `fuzz/__init__.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fuzz.instrument import instrumented

with instrumented():
    from hub.protocol.lines import LinesCodec

from fuzz.codec_harness import codec_target, framed, seeds_from_vectors

MAX_FRAME_BYTES = 4096


def factory(role: Any) -> LinesCodec:
    return LinesCodec(role, max_frame_bytes=MAX_FRAME_BYTES)


one_input = codec_target(factory)


def seeds() -> Iterator[bytes]:
    from hub.protocol.events import Role
    from tests.unit.protocol_vectors import LINES_ACCEPTED, LINES_VECTORS

    hello = LINES_VECTORS[0].wire
    yield from seeds_from_vectors(LINES_VECTORS, hello)
    for role, line, event in LINES_ACCEPTED:
        if role is Role.HUB:
            yield framed(0, line if type(event).__name__ == "Hello" else hello + line)
        else:
            yield framed(1, line)
