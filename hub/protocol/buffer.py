"""The receive side both built-in codecs share: a bounded buffer of received bytes.

Layer: core; imports only `hub.errors` and `hub.protocol.events`. Sans-IO.

h11's `ReceiveBuffer`, shaped for speed. Bytes fed by `receive_data()` are
appended to one `bytearray`; a codec consumes them by moving `_pos` past a
complete frame (native) or line (lines) without copying, and `_scan` remembers
how far a line search found no newline, so a line fed byte by byte is searched
once. Consumed bytes are dropped from the front only when everything was
consumed or `_COMPACT_AT` of them piled up, so a burst of small frames costs
no copying.

Bounded: a codec never lets more than `max_frame_bytes` of one unfinished
frame wait here. The native codec refuses a header that announces a larger
frame before its body is buffered, the lines codec refuses a line once that
many bytes came without a newline (docs/protocol.md, "Limits"); either way the
buffer holds at most one frame's limit plus the last read.

The codecs inherit this class rather than holding one: `receive_data()` then
costs no extra call per read, which on a TCP connection is about one call per
message. `next_event()` is here too, because both codecs make errors sticky
the same way; a codec supplies `_next_event()`.
"""

from __future__ import annotations

from typing import Final

from hub.errors import LocalProtocolError, RemoteProtocolError
from hub.protocol.events import Event, NakReason, NeedData

__all__ = ["ReceiveBuffer"]

# Consumed bytes are dropped from the front of the buffer only once this many
# have piled up (or all of it was consumed).
_COMPACT_AT: Final = 64 * 1024


class ReceiveBuffer:
    """Received bytes not yet consumed, end of stream, and the sticky receive error."""

    __slots__ = ("_buf", "_eof", "_error", "_pos", "_scan", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        #: The bound on one frame (or line), header and terminator included.
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0  # everything before it has been consumed
        self._scan = 0  # no newline before it (used by line-framed codecs)
        self._eof = False
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; `b""` signals end of stream (docs/protocol.md, "End of stream").

        Non-empty data after end of stream is the caller's bug: LocalProtocolError.
        After a RemoteProtocolError the codec is dead and ignores further data.
        """
        if self._error is not None:
            return
        if self._eof:
            if data:
                raise LocalProtocolError(
                    "data received after end of stream", code=NakReason.INTERNAL
                )
            return
        if not data:
            self._eof = True
            return
        pos = self._pos
        if pos:
            if pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
                self._scan = 0
            elif pos >= _COMPACT_AT:
                del self._buf[:pos]
                self._scan = max(0, self._scan - pos)
                self._pos = 0
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next event, `NEED_DATA`, or `ConnectionClosed()` after end of stream.

        Raises RemoteProtocolError on bad input, and the same error again on
        every later call (docs/protocol.md, "Errors").
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event | NeedData:
        """The codec's framing: one event from the buffer, or `NEED_DATA`."""
        raise NotImplementedError
