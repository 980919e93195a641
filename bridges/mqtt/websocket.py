"""MQTT over WebSockets: one client's WebSocket connection, seen as a stream of MQTT bytes.

Layer: bridges; imports the `hub` core (`hub.mqtt_rules`), amqtt's writer
adapter and the sans-IO protocol of the `websockets` library (no server of
its own: the broker's listener accepts the connection, bridges.mqtt.listener).

The listener accepts a WebSocket client exactly as a TCP one (limits per
source address, `mqtt_max_connections`, the TLS handshake on wss), then
`WebSocketStream.open` runs the opening handshake within
`mqtt_connect_timeout_s`: an HTTP GET of path `/mqtt` offering the
subprotocol `mqtt` ([MQTT-6.0.0-3], [MQTT-6.0.0-4]); anything else, and
frames sent before the answer (RFC 6455 4.1), is answered with an HTTP error
and closed. From then on the stream is what
`bridges.mqtt.reader.PacketReader` reads from, so that every MQTT check is
the one TCP clients get:

- `readexactly(n)` reads the socket only when the packet reader asks for
  bytes (backpressure and the timeouts are the reader's, as on TCP), feeds
  the WebSocket protocol and hands out the payload of binary frames; a frame
  may hold several packets or part of one [MQTT-6.0.0-2].
- A text frame ([MQTT-6.0.0-1]), a frame that breaks RFC 6455 and a message
  larger than the largest MQTT packet are protocol violations: the reader
  counts them and ends the connection, with a WebSocket close frame.
- Ping and close frames are answered by the protocol object itself.

`WebSocketWriter` is amqtt's writer adapter over the same stream: each drain
sends what amqtt wrote as one binary frame.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol
from urllib.parse import urlsplit

from amqtt.adapters import StreamWriterAdapter
from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from hub.mqtt_rules import TOO_LARGE, ProtocolViolation

#: The path and the subprotocol clients connect with (paho, MQTT.js and Mosquitto's defaults).
PATH = "/mqtt"
SUBPROTOCOL = Subprotocol("mqtt")
#: The longest fixed header of an MQTT packet: a message may hold a whole packet and its header.
_FIXED_HEADER_BYTES = 5
_READ_BYTES = 64 * 1024


class ByteSink(Protocol):
    """Where the stream writes (an `asyncio.StreamWriter`; a buffer in the fuzz target)."""

    def write(self, data: bytes) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...


class HandshakeFailed(Exception):
    """The client's opening handshake was refused (why, for the DEBUG log)."""


class WebSocketStream:
    """A WebSocket connection on an accepted asyncio stream; see the module docstring."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: ByteSink, *, max_packet_bytes: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = ServerProtocol(
            subprotocols=[SUBPROTOCOL], max_size=max_packet_bytes + _FIXED_HEADER_BYTES
        )
        self._data = bytearray()
        #: Set once the protocol object sees no more data frames.
        self._ended = False
        #: What the close frame says; `violation` makes it a protocol error.
        self._close_code = CloseCode.NORMAL_CLOSURE

    async def open(self, timeout_s: float) -> None:
        """Run the opening handshake within `timeout_s`; HandshakeFailed (the
        client was answered with an HTTP error) or TimeoutError when it fails."""
        async with asyncio.timeout(timeout_s):
            while True:
                data = await self._reader.read(_READ_BYTES)
                if data:
                    self._protocol.receive_data(data)
                else:
                    self._protocol.receive_eof()
                events = self._protocol.events_received()
                request = next((e for e in events if isinstance(e, Request)), None)
                if request is not None:
                    self._answer(request, early=any(isinstance(e, Frame) for e in events))
                    return
                if self._protocol.handshake_exc is not None or not data:
                    self._flush()
                    raise HandshakeFailed(str(self._protocol.handshake_exc or "closed"))

    def _answer(self, request: Request, *, early: bool) -> None:
        if early:
            # RFC 6455 4.1: a client waits for the answer before it sends more.
            # The protocol object already answered a ping among those frames:
            # that pong must not go out ahead of the HTTP answer.
            self._protocol.data_to_send()
            problem = "frames sent before the handshake answer"
            response = self._protocol.reject(400, f"{problem}\n")
        elif urlsplit(request.path).path != PATH:
            problem = f"path {request.path!r}"
            response = self._protocol.reject(404, f"MQTT over WebSockets is served at {PATH}\n")
        else:
            response = self._protocol.accept(request)
            problem = str(self._protocol.handshake_exc)
        self._protocol.send_response(response)
        self._flush()
        if response.status_code != 101:
            raise HandshakeFailed(f"HTTP {response.status_code}: {problem}")

    # -- what PacketReader reads ------------------------------------------------------

    async def readexactly(self, n: int) -> bytes:
        """`n` bytes of MQTT data; IncompleteReadError once the connection ended."""
        while len(self._data) < n:
            if self._ended:
                # As asyncio.StreamReader: the partial bytes go with the error,
                # so a read after it finds the end of stream again, not them.
                partial = bytes(self._data)
                self._data.clear()
                raise asyncio.IncompleteReadError(partial, n)
            await self._pull()
        data = bytes(self._data[:n])
        del self._data[:n]
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    async def _pull(self) -> None:
        try:
            data = await self._reader.read(_READ_BYTES)
        except OSError:  # reset, or a TLS error on wss: the client is gone
            data = b""
        if data:
            self._protocol.receive_data(data)
        else:
            self._protocol.receive_eof()
        self._take([e for e in self._protocol.events_received() if isinstance(e, Frame)])
        self._flush()
        if self._protocol.state is not State.OPEN:
            self._ended = True
        failure = self._protocol.parser_exc
        if failure is not None and not isinstance(failure, EOFError):
            self._ended = True
            if isinstance(failure, PayloadTooBig):
                raise ProtocolViolation(f"WebSocket: {failure}", reason=TOO_LARGE)
            raise ProtocolViolation(f"WebSocket: {failure}")

    def _take(self, frames: list[Frame]) -> None:
        for frame in frames:
            if frame.opcode in (Opcode.BINARY, Opcode.CONT):
                self._data += frame.data
            elif frame.opcode is Opcode.TEXT:
                # [MQTT-6.0.0-1]: MQTT travels in binary frames only.
                self._ended = True
                self.close(CloseCode.UNSUPPORTED_DATA, "MQTT needs binary frames")
                raise ProtocolViolation("WebSocket: a text frame [MQTT-6.0.0-1]")
            # Ping, pong and close: the protocol object answers them.

    # -- writing ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send `data` as one binary frame now (a CONNACK refusing the client)."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_binary(data)
            self._flush()

    def violation(self) -> None:
        """The client broke MQTT: the close frame to come says protocol error (1002)."""
        self._close_code = CloseCode.PROTOCOL_ERROR

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Start the closing handshake (once); the socket is closed by the listener."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(self._close_code if code is None else code, reason)
            self._flush()

    def _flush(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client is gone
            for data in self._protocol.data_to_send():
                if data:
                    self._writer.write(data)
                elif self._writer.can_write_eof():
                    self._writer.write_eof()


class WebSocketWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's writer over a `WebSocketStream`: each drain is one binary frame."""

    def __init__(self, writer: asyncio.StreamWriter, stream: WebSocketStream) -> None:
        super().__init__(writer)
        self._stream = stream
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        if not self.is_closed:
            self._pending += data

    def send_now(self, data: bytes) -> None:
        """Send what is pending and `data` as one frame now, without a drain.

        For writers that never drain after a write (the acknowledgement
        sequencer, bridges.mqtt.acks): bytes only leave in frames, so a write
        that waits for a drain that never comes would never be sent.
        """
        if not self.is_closed:
            self._pending += data
            self._send_pending()

    def _send_pending(self) -> None:
        if self._pending and not self.is_closed:
            data, self._pending = bytes(self._pending), bytearray()
            self._stream.send(data)

    async def drain(self) -> None:
        self._send_pending()
        await super().drain()

    async def close(self) -> None:
        if not self.is_closed:
            self._stream.close()
        await super().close()
