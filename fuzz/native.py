"""Fuzz target `native`: the native codec in the hub and the device role.

Layer: tooling (see `fuzz/__init__.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fuzz.instrument import instrumented

with instrumented():
    from hub.protocol.native import NativeCodec

from fuzz.codec_harness import codec_target, seeds_from_vectors

#: Small, so that the fuzzer also reaches the TOO_LARGE refusal.
MAX_FRAME_BYTES = 4096


def factory(role: Any) -> NativeCodec:
    return NativeCodec(role, max_frame_bytes=MAX_FRAME_BYTES)


one_input = codec_target(factory)


def seeds() -> Iterator[bytes]:
    from tests.unit.protocol_vectors import NATIVE_VECTORS

    yield from seeds_from_vectors(NATIVE_VECTORS, NATIVE_VECTORS[0].wire)
