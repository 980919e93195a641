"""The harness shared by the codec targets: one stream into one codec, checked.

Layer: tooling (see `fuzz/__init__.py`). Imports nothing at module level but
the standard library, so that a target can instrument the codec's modules
before anything else imports them.

The first byte of an input chooses the receiving role (bit 0) and how the rest
is cut into `receive_data` calls (bits 1-7: the chunk size, 0 meaning whole):
the same bytes in different splits must give the same events. Every event
received must encode again, in the sending role, to bytes that decode to an
equal event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

#: Events a codec may have to produce from one input, at most (guards a bug
#: that would loop forever on a buffer it does not consume).
_MAX_EVENTS = 10_000


class Finding(AssertionError):
    """The codec broke its contract on this input."""


def roles() -> tuple[Any, Any]:
    from hub.protocol.events import Role

    return Role.HUB, Role.DEVICE


def split(data: bytes) -> tuple[Any, list[bytes]]:
    """The receiving role and the chunks an input stands for."""
    hub, device = roles()
    if not data:
        return hub, []
    role = device if data[0] & 1 else hub
    size = data[0] >> 1
    body = data[1:]
    if size == 0:
        return role, [body] if body else []
    return role, [body[i : i + size] for i in range(0, len(body), size)]


def receive_all(codec: Any, chunks: list[bytes]) -> tuple[list[Any], BaseException | None]:
    """Feed the chunks and end of stream; every event, and the remote error if any."""
    from hub.errors import RemoteProtocolError
    from hub.protocol.events import NEED_DATA, ConnectionClosed

    events: list[Any] = []

    def drain() -> bool:
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                return False
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return True
            if len(events) > _MAX_EVENTS:
                raise Finding(f"more than {_MAX_EVENTS} events from one input")

    try:
        for chunk in chunks:
            codec.receive_data(chunk)
            if drain():
                return events, None
        codec.receive_data(b"")
        if not drain():
            raise Finding("NEED_DATA after end of stream")
    except RemoteProtocolError as exc:
        # A dead codec keeps saying so (docs/protocol.md, "Errors").
        try:
            codec.next_event()
        except RemoteProtocolError as again:
            if again is not exc:
                raise Finding("a second, different error after the first") from exc
        else:
            raise Finding("next_event() returned after a RemoteProtocolError") from exc
        return events, exc
    return events, None


def check_reencodes(factory: Callable[..., Any], receiver: Any, events: list[Any]) -> None:
    """Each event received by `receiver` re-encodes in the other role to itself."""
    from hub.errors import LocalProtocolError
    from hub.protocol.events import ConnectionClosed

    hub, device = roles()
    sender_role = device if receiver is hub else hub
    # The hub only receives after a HELLO, so a hub's events start with it and
    # the device-role sender is in the right state for the rest.
    sender = factory(sender_role)
    decoder = factory(receiver)
    for event in events:
        if isinstance(event, ConnectionClosed):
            continue
        try:
            wire = sender.send(event)
        except LocalProtocolError as exc:
            raise Finding(f"received {event!r}, which the other role cannot send: {exc}") from exc
        decoder.receive_data(wire)
        again = decoder.next_event()
        if again != event:
            raise Finding(f"{event!r} re-encoded to {wire!r}, which decodes to {again!r}")


def codec_target(factory: Callable[..., Any]) -> Callable[[bytes], None]:
    """The `one_input` of a codec target."""

    def one_input(data: bytes) -> None:
        role, chunks = split(data)
        events, error = receive_all(factory(role), chunks)
        # The same bytes whole give the same events and the same error.
        whole_events, whole_error = receive_all(factory(role), [b"".join(chunks)] if chunks else [])
        if whole_events != events or type(whole_error) is not type(error):
            raise Finding(f"split and whole differ: {events!r} / {whole_events!r}")
        if _where(error) != _where(whole_error):
            raise Finding(f"split and whole fail differently: {error!r} / {whole_error!r}")
        check_reencodes(factory, role, events)

    return one_input


def _where(error: BaseException | None) -> tuple[int, int] | None:
    """A remote error's NAK code and sequence number (what the hub answers with)."""
    if error is None:
        return None
    return (int(getattr(error, "code", -1)), int(getattr(error, "seq", -1)))


def framed(role_byte: int, *parts: bytes) -> bytes:
    """A seed: the role byte and the concatenated wire bytes."""
    return bytes([role_byte]) + b"".join(parts)


def seeds_from_vectors(vectors: Any, hello: bytes) -> Iterator[bytes]:
    """Seeds for a codec: every golden vector, to each role that may receive it,
    whole and in small chunks; the hub's after a HELLO."""
    _, device = roles()
    for vector in vectors:
        for receiver in vector.receivers:
            stream = (
                vector.wire
                if receiver is device or vector.name.startswith("hello")
                else (hello + vector.wire)
            )
            bit = 1 if receiver is device else 0
            for size in (0, 1, 7):
                yield framed(bit | size << 1, stream)
