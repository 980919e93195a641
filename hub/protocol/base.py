"""The interface every device protocol codec implements, and how codecs are found.

Layer: core; imports only `hub.protocol.events` and `hub.errors`.

The pattern is h11's: `receive_data(bytes)` (`b""` means end of stream), then
`next_event()` until it returns `NEED_DATA`; `send(event) -> bytes`. A codec
raises only `RemoteProtocolError` on bad input; anything else is a bug.
Codecs are registered under the `hub.codecs` entry point group, so a
third-party package can add a protocol without touching the hub.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import ClassVar, Protocol, runtime_checkable

from hub.errors import ConfigError
from hub.protocol.events import NEED_DATA, Event, Role, _NeedData

__all__ = ["NEED_DATA", "Codec", "CodecFactory", "available_codecs", "load_codec"]

DEFAULT_MAX_FRAME_BYTES = 65536


@runtime_checkable
class Codec(Protocol):
    """A sans-IO codec instance for one connection."""

    #: Name used in configuration and in envelopes' `protocol` field.
    name: ClassVar[str]

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; `b""` signals end of stream."""

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or `NEED_DATA`. Raises `RemoteProtocolError` on bad input."""

    def send(self, event: Event) -> bytes:
        """Encode an event for the wire.

        Raises `LocalProtocolError` for an event our role may not send.
        """


class CodecFactory(Protocol):
    # A read-only property, not a ClassVar: a class object (the usual factory)
    # can never match a ClassVar protocol member, only an attribute it exposes.
    @property
    def name(self) -> str: ...

    def __call__(
        self, role: Role, *, max_frame_bytes: int = ..., max_payload_depth: int = ...
    ) -> Codec: ...


def available_codecs() -> dict[str, CodecFactory]:
    """Every codec registered under the `hub.codecs` entry point group, by name."""
    found: dict[str, CodecFactory] = {}
    for ep in entry_points(group="hub.codecs"):
        found[ep.name] = ep.load()
    # The built-in codecs work from a source checkout that was never installed, too.
    if "native" not in found:
        from hub.protocol.native import NativeCodec

        found["native"] = NativeCodec
    if "lines" not in found:
        from hub.protocol.lines import LinesCodec

        found["lines"] = LinesCodec
    return found


def load_codec(name: str) -> CodecFactory:
    """The codec factory registered as `name`; a clear ConfigError otherwise."""
    codecs = available_codecs()
    try:
        return codecs[name]
    except KeyError:
        raise ConfigError(
            f"unknown codec {name!r}; available: {', '.join(sorted(codecs))}",
            key="tcp.listeners.codec",
        ) from None
