"""The TCP bridge: device connections speaking a registered codec, in and out of envelopes.

Layer: bridges; imports the `hub` core only.

One `TcpServer` per configured listener (port + codec). Each connection owns a
sans-IO codec in the hub role; this module only moves bytes and applies the
rules of docs/protocol.md ("Connection lifecycle"): the first frame must be a
HELLO with a valid credential; every TELEMETRY, EVENT or STATE frame becomes an
envelope, and the device gets its ACK only once the dispatcher made it
durable. A connection with too many unacknowledged frames stops being read
(backpressure), a silent one is closed after the idle timeout, and a protocol
violation gets a NAK with its reason and a close: it never touches another
device's connection.

Hostile or broken peers cannot hold descriptors (docs/protocol.md, "Deadlines
and limits of the hub"): a connection has `hello_timeout_s` from its accept to
an accepted HELLO, and bytes that trickle in do not extend it; the idle
timeout is one timer per connection, armed for the exact moment the silence
reaches `idle_timeout_s`; and beyond `tcp_max_connections` open connections a
new one is closed as soon as it is accepted. Each of these is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from hub.envelope import Envelope, Kind, envelope_id
from hub.errors import AuthError, ConfigError, DispatchError, RemoteProtocolError
from hub.metrics import Metrics
from hub.protocol.base import CodecFactory
from hub.protocol.discovery import load_codec
from hub.protocol.events import (
    NEED_DATA,
    Ack,
    Command,
    CommandResult,
    ConnectionClosed,
    DeviceEvent,
    Hello,
    Nak,
    NakReason,
    Ping,
    Pong,
    Role,
    StateReport,
    Telemetry,
)
from hub.registry import CredentialCache
from hub.settings import Settings, TcpListener
from hub.uplink import presence_envelope

log = logging.getLogger(__name__)

_KINDS: dict[type[Any], Kind] = {
    Telemetry: Kind.TELEMETRY,
    DeviceEvent: Kind.EVENT,
    StateReport: Kind.STATE,
}
#: Reasons, the `reason` label of hub_protocol_errors_total / hub_connections_refused_total.
HELLO_TIMEOUT = "hello_timeout"
IDLE_TIMEOUT = "idle_timeout"
CONNECTION_LIMIT = "connection_limit"
#: At most one log line per this many seconds about connections refused at the limit.
_LIMIT_LOG_INTERVAL_S = 10.0

_AUTH_REASONS = {
    "unknown_device": NakReason.UNKNOWN_DEVICE,
    "bad_credential": NakReason.BAD_CREDENTIAL,
}


class Dispatch(Protocol):
    """What the TCP bridge needs of the dispatcher (see bridges.dispatch.Dispatcher)."""

    def submit(self, envelope: Envelope) -> asyncio.Future[None]: ...


class ConnectionEvents(Protocol):
    """Told when a device connects or goes (see bridges.downlink.Downlink)."""

    def device_connected(self, device_id: str, transport: str) -> None: ...

    def device_disconnected(self, device_id: str) -> None: ...


class DeviceConnection(asyncio.Protocol):
    """One device's TCP connection."""

    def __init__(self, server: TcpServer) -> None:
        self._server = server
        self._codec = server.codec_factory(
            Role.HUB,
            max_frame_bytes=server.max_frame_bytes,
            max_payload_depth=server.max_payload_depth,
        )
        self._transport: asyncio.Transport | None = None
        self.device_id: str | None = None
        # When the HELLO was accepted: names this connection in its presence.
        self.connected_at = datetime.now(UTC)
        self._boot_id = 0
        self._authenticating = False
        self._inflight = 0
        self._paused = False
        self._closing = False
        self._last_activity = time.monotonic()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._hello_handle: asyncio.TimerHandle | None = None
        #: In the server's connection set (False when refused at the limit).
        self._admitted = False
        self._command_seq = 0
        self._commands_sent: set[str] = set()
        self.peer = "?"

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        server = self._server
        if len(server.connections) >= server.max_connections:
            # Over the limit: closed before a byte is read, so that the
            # descriptors left stay free for devices already connected, the
            # other listeners and /healthz.
            self._closing = True
            server.refused_at_limit()
            self._transport.abort()
            return
        self._admitted = True
        server.connections.add(self)
        server.metrics.connections.labels("tcp").inc()
        loop = asyncio.get_running_loop()
        self._hello_handle = loop.call_later(server.hello_timeout_s, self._hello_deadline)
        self._arm_idle_timer(server.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for handle in (self._idle_handle, self._hello_handle):
            if handle is not None:
                handle.cancel()
        if not self._admitted:
            return
        self._server.connections.discard(self)
        self._server.metrics.connections.labels("tcp").dec()
        if self.device_id is not None and self._server.devices.get(self.device_id) is self:
            del self._server.devices[self.device_id]
            self._server.presence(self.device_id, online=False, since=self.connected_at)
            if self._server.events is not None:
                self._server.events.device_disconnected(self.device_id)

    def data_received(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        self._codec.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self._codec.receive_data(b"")
        self._process()
        return None

    def pause_writing(self) -> None:
        # The device reads slowly; stop reading from it too, so ACKs do not pile up.
        self._pause()

    def resume_writing(self) -> None:
        self._maybe_resume()

    # -- events ------------------------------------------------------------

    def _process(self) -> None:
        while not self._closing and not self._authenticating:
            try:
                event = self._codec.next_event()
            except RemoteProtocolError as exc:
                self._refuse(exc.seq, NakReason(exc.code), str(exc))
                return
            if event is NEED_DATA:
                return
            self._handle(event)

    def _handle(self, event: Any) -> None:
        kind = _KINDS.get(type(event))
        if kind is not None:
            self._data(event, kind)
        elif isinstance(event, Hello):
            self._hello(event)
        elif isinstance(event, Ping):
            self._send(Pong(event.seq))
        elif isinstance(event, ConnectionClosed):
            self._close()
        elif isinstance(event, CommandResult):
            self._command_result(event)
        elif isinstance(event, (Pong, Ack, Nak)):
            return  # keep-alive answers and acks of commands need nothing here
        else:  # pragma: no cover - the codec's role rules exclude anything else
            log.error("unexpected event %r from %s", event, self.peer)

    def _hello(self, hello: Hello) -> None:
        cache = self._server.credentials
        if not cache.missing(hello.device_id):
            try:
                cache.verify(hello.device_id, hello.credential)
            except AuthError:
                pass  # perhaps re-registered since it was cached: look again below
            else:
                self._accept(hello)
                return
        # Unknown here, or the credential did not match: read the registry off
        # the loop, and stop reading meanwhile (the codec keeps any frames that
        # follow the HELLO).
        self._authenticating = True
        task = asyncio.ensure_future(self._refresh_then_verify(hello))
        self._server.background.add(task)
        task.add_done_callback(self._server.background.discard)

    async def _refresh_then_verify(self, hello: Hello) -> None:
        try:
            await self._server.refresh_credentials(hello.device_id)
        except Exception:  # boundary: the registry is unavailable
            log.exception("registry lookup failed for %r", hello.device_id)
            self._authenticating = False
            self._refuse(hello.seq, NakReason.INTERNAL, "registry unavailable")
            return
        self._authenticating = False
        if self._closing:
            return
        self._verify(hello)
        self._process()

    def _verify(self, hello: Hello) -> None:
        try:
            self._server.credentials.verify(hello.device_id, hello.credential)
        except AuthError as exc:
            self._server.metrics.auth_failures.labels("tcp", exc.reason).inc()
            log.warning("refused device %r from %s: %s", hello.device_id, self.peer, exc.reason)
            self._refuse(hello.seq, _AUTH_REASONS[exc.reason], exc.reason, count=False)
            return
        self._accept(hello)

    def _accept(self, hello: Hello) -> None:
        if self._hello_handle is not None:
            self._hello_handle.cancel()
            self._hello_handle = None
        self.device_id = hello.device_id
        self._boot_id = hello.boot_id
        previous = self._server.devices.get(hello.device_id)
        if previous is not None and previous is not self:
            # The device reconnected while its old socket still looks open (a
            # half-open connection): the newest one wins.
            log.info(
                "device %r reconnected from %s; closing its older connection",
                hello.device_id,
                self.peer,
            )
            previous._close()
        self._server.devices[hello.device_id] = self
        self._send(Ack(hello.seq))
        self.connected_at = datetime.now(UTC)
        self._server.presence(hello.device_id, online=True, since=self.connected_at)
        if self._server.events is not None:
            self._server.events.device_connected(hello.device_id, "tcp")

    def _data(self, event: Telemetry | DeviceEvent | StateReport, kind: Kind) -> None:
        device_id = self.device_id
        assert device_id is not None  # the codec refuses data before HELLO
        server = self._server
        server.received.inc()
        try:
            envelope = Envelope(
                id=envelope_id(device_id, event.seq, self._boot_id),
                device_id=device_id,
                kind=kind,
                seq=event.seq,
                payload=event.payload,
                device_time=(
                    datetime.fromtimestamp(event.device_time_ms / 1000, UTC)
                    if event.device_time_ms
                    else None
                ),
                transport="tcp",
                protocol=server.codec_name,
            )
            future = server.dispatcher.submit(envelope)
        except Exception as exc:  # boundary: a bad payload or a stopped dispatcher
            server.metrics.invalid_payloads.labels("tcp").inc()
            log.warning("device %r seq %d refused: %s", device_id, event.seq, exc)
            self._send(Nak(event.seq, NakReason.BAD_PAYLOAD, str(exc)[:200]))
            return
        self._inflight += 1
        seq = event.seq
        future.add_done_callback(lambda f: self._durable(seq, f))
        if self._inflight >= server.max_inflight:
            self._pause()

    def _durable(self, seq: int, future: asyncio.Future[None]) -> None:
        self._inflight -= 1
        if future.cancelled() or future.exception() is not None:
            # Not durable (hub shutting down): no ACK, the device sends it again.
            return
        if not self._closing:
            self._server.acked.inc()
            self._send(Ack(seq))
        self._maybe_resume()

    def _command_result(self, event: CommandResult) -> None:
        device_id = self.device_id
        assert device_id is not None
        try:
            envelope = Envelope(
                device_id=device_id,
                kind=Kind.COMMAND_RESULT,
                payload={
                    "command_id": event.command_id,
                    "ok": event.ok,
                    "result": event.result,
                    "error": event.error,
                },
                transport="tcp",
                protocol=self._server.codec_name,
            )
            future = self._server.dispatcher.submit(envelope)
        except Exception as exc:  # boundary: a result that is not JSON-safe
            log.warning("device %r: bad command result: %s", device_id, exc)
            self._send(Nak(event.seq, NakReason.BAD_PAYLOAD, str(exc)[:200]))
            return
        seq = event.seq
        future.add_done_callback(lambda f: self._durable_result(seq, f))

    def _durable_result(self, seq: int, future: asyncio.Future[None]) -> None:
        if not self._closing and not future.cancelled() and future.exception() is None:
            self._send(Ack(seq))

    def send_command(self, command_id: str, name: str, args: dict[str, Any]) -> bool:
        """Send a command frame unless this connection already carried that command."""
        if self._closing or command_id in self._commands_sent:
            return not self._closing
        self._commands_sent.add(command_id)
        self._command_seq = (self._command_seq + 1) & 0xFFFFFFFF
        self._send(Command(seq=self._command_seq, command_id=command_id, name=name, args=args))
        return True

    # -- flow control, errors, timeouts -------------------------------------

    def _pause(self) -> None:
        if not self._paused and self._transport is not None and not self._closing:
            self._paused = True
            self._transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (
            self._paused
            and not self._closing
            and self._transport is not None
            and self._inflight < self._server.max_inflight // 2 + 1
            and not self._transport.is_closing()
        ):
            self._paused = False
            # Not reading was our own doing: the device's silence counts from now.
            self._last_activity = time.monotonic()
            self._transport.resume_reading()

    def _refuse(self, seq: int, reason: NakReason, message: str, *, count: bool = True) -> None:
        if count:
            self._server.metrics.protocol_errors.labels("tcp", reason.name.lower()).inc()
            log.warning(
                "closing %s (device %r): %s: %s",
                self.peer,
                self.device_id,
                reason.name,
                message,
            )
        self._send(Nak(seq, reason, message[:200]))
        self._close()

    def _send(self, event: Any) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._codec.send(event))

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            # close() flushes what was written (the NAK) before closing.
            self._transport.close()

    def _abort(self) -> None:
        # A deadline passed: nothing written is worth flushing to a peer that
        # may never read it (close() would wait for that, holding the socket).
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _hello_deadline(self) -> None:
        """`hello_timeout_s` after the accept, with no HELLO accepted: close,
        however many bytes trickled in meanwhile."""
        self._hello_handle = None
        if self._closing or self.device_id is not None:
            return
        self._server.hello_timeouts.inc()
        log.info(
            "closing %s: no accepted HELLO within %.1f s (hello_timeout_s)",
            self.peer,
            self._server.hello_timeout_s,
        )
        self._abort()

    def _arm_idle_timer(self, delay_s: float) -> None:
        # One timer per connection, not one reset per frame: when it fires
        # early (there was traffic since it was armed) it is armed again for
        # the exact moment the silence would reach the timeout.
        loop = asyncio.get_running_loop()
        self._idle_handle = loop.call_later(max(delay_s, 0.0), self._idle_check)

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self._closing:
            return
        timeout = self._server.idle_timeout_s
        idle = time.monotonic() - self._last_activity
        if idle < timeout:
            self._arm_idle_timer(timeout - idle)
            return
        if self._inflight:
            # Frames wait for the hub (not read meanwhile): not the device's silence.
            self._arm_idle_timer(timeout)
            return
        self._server.idle_timeouts.inc()
        log.info("closing %s (device %r): idle for %.1f s", self.peer, self.device_id, idle)
        self._abort()


class TcpServer:
    """One listener: a port and the codec it speaks."""

    def __init__(
        self,
        settings: Settings,
        listener: TcpListener,
        dispatcher: Dispatch,
        credentials: CredentialCache,
        refresh_credentials: Callable[[str], Awaitable[None]],
        metrics: Metrics,
        events: ConnectionEvents | None = None,
    ) -> None:
        self.host = listener.host or settings.host
        self.events = events
        self.requested_port = listener.port
        self.codec_name = listener.codec
        self.codec_factory: CodecFactory = load_codec(listener.codec)
        self.dispatcher = dispatcher
        self.credentials = credentials
        self.refresh_credentials = refresh_credentials
        self.metrics = metrics
        # Labelled children looked up once: `labels()` per message is measurable.
        self.received = metrics.messages_received.labels("tcp")
        self.acked = metrics.messages_acked.labels("tcp")
        self.idle_timeout_s = settings.idle_timeout_s
        self.hello_timeout_s = settings.hello_timeout_s
        self.max_connections = settings.tcp_max_connections
        self._limit_refusals = metrics.connections_refused.labels("tcp", CONNECTION_LIMIT)
        # Deadlines of many connections can pass in one loop iteration.
        self.hello_timeouts = metrics.protocol_errors.labels("tcp", HELLO_TIMEOUT)
        self.idle_timeouts = metrics.protocol_errors.labels("tcp", IDLE_TIMEOUT)
        self._limit_logged_at = -_LIMIT_LOG_INTERVAL_S
        self._limit_unlogged = 0
        self.max_frame_bytes = settings.max_frame_bytes
        self.max_payload_depth = settings.max_payload_depth
        self.max_inflight = settings.max_inflight_per_connection
        self.connections: set[DeviceConnection] = set()
        self.devices: dict[str, DeviceConnection] = {}
        self.background: set[asyncio.Future[None]] = set()
        self._server: asyncio.Server | None = None

    def refused_at_limit(self) -> None:
        """Count a connection closed at `tcp_max_connections`; log at most one
        line per interval, so a flood of connections cannot flood the log."""
        self._limit_refusals.inc()
        self._limit_unlogged += 1
        now = time.monotonic()
        if now - self._limit_logged_at >= _LIMIT_LOG_INTERVAL_S:
            log.warning(
                "TCP port %d (%s): %d connection(s) refused, %d open is the limit "
                "(tcp_max_connections / HUB_TCP_MAX_CONNECTIONS)",
                self.port,
                self.codec_name,
                self._limit_unlogged,
                self.max_connections,
            )
            self._limit_logged_at = now
            self._limit_unlogged = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def serving(self) -> bool:
        """True while the listener accepts connections (for /readyz)."""
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: DeviceConnection(self),
                self.host,
                self.requested_port,
                reuse_address=True,
                backlog=4096,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"TCP port {self.requested_port} ({self.codec_name}) on {self.host} is "
                    "already in use; choose another with tcp_port / HUB_TCP_PORT "
                    "(or tcp_listeners in the configuration file)",
                    key="tcp_port",
                    env="HUB_TCP_PORT",
                ) from None
            raise ConfigError(
                f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror}",
                key="host",
                env="HUB_HOST",
            ) from None

    def deliver_command(self, command: Any) -> bool:
        """Hand a `hub.commands.PendingCommand` to the device if it is connected here."""
        connection = self.devices.get(command.device_id)
        if connection is None:
            return False
        return connection.send_command(command.id, command.name, command.args)

    def disconnect_device(self, device_id: str) -> bool:
        """Close the device's connection if it is held here (re-keyed or removed)."""
        connection = self.devices.get(device_id)
        if connection is None:
            return False
        connection._close()
        return True

    def presence(self, device_id: str, *, online: bool, since: datetime) -> None:
        """Record a connect or disconnect of the connection accepted at `since` as a
        presence envelope (not acknowledged to anyone; ordered by hub/presence.py)."""
        with contextlib.suppress(DispatchError):  # shutting down: presence is best effort
            self.dispatcher.submit(
                presence_envelope(
                    device_id,
                    online=online,
                    since=since,
                    transport="tcp",
                    protocol=self.codec_name,
                )
            )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection._close()
        await self._server.wait_closed()
        self._server = None
