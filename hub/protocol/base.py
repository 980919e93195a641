"""The interface every device protocol codec implements.

Layer: core; imports only `hub.protocol.events` and `hub.protocol.rules`.

The pattern is h11's: `receive_data(bytes)` (`b""` means end of stream), then
`next_event()` until it returns `NEED_DATA`; `send(event) -> bytes`. A codec
raises only `RemoteProtocolError` on bad input; anything else is a bug.
How codecs are found by name is `hub.protocol.discovery`'s business, so that
this interface imports no codec and no codec imports discovery.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from hub.protocol.events import NEED_DATA, Event, NeedData, Role
from hub.protocol.rules import DEFAULT_MAX_FRAME_BYTES

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "NEED_DATA", "Codec", "CodecFactory"]


@runtime_checkable
class Codec(Protocol):
    """A sans-IO codec instance for one connection."""

    #: Name used in configuration and in envelopes' `protocol` field.
    name: ClassVar[str]

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; `b""` signals end of stream."""

    def next_event(self) -> Event | NeedData:
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
