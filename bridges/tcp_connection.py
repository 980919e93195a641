"""One device's TCP connection, and the frozen context its listener hands it.

Layer: bridges; imports the `hub` core, `bridges.transport`, `bridges.tls` and
`bridges.address_gate` only.
Over 400 lines on purpose: one connection's state machine (handshake,
backpressure, deadlines, commands) reads best as one class.

`DeviceConnection` is an `asyncio.Protocol` that owns a sans-IO codec in the
hub role and applies docs/protocol.md, "Connection lifecycle": the first frame
must be a HELLO with a valid credential; every TELEMETRY, EVENT or STATE frame
becomes an envelope (`hub.uplink`), and the device gets its ACK only once the
sink made it durable. A connection with too many unacknowledged frames stops
being read (backpressure), a silent one is closed after the idle timeout, and
a protocol violation gets a NAK with its reason and a close: it never touches
another device's connection.

On a TLS listener (`tls = true`, docs/security.md, "TCP over TLS") the
listener does the handshake (bridges/tcp.py) and the connection starts with a
TLS transport. With `tls_identity` on, a HELLO for another device than the one
the verified client certificate names is refused.

Everything a connection needs of its listener is in one `ListenerContext`,
built once per listener (`bridges.tcp.TcpServer`) and shared by its
connections: settings, the codec, metrics children looked up once, the sink,
and the listener's tables of connections and devices. Its fields are fixed;
the tables it refers to are the listener's, and change as devices come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from prometheus_client import Counter

from bridges.address_gate import AddressGate
from bridges.tls import IdentityMode, certificate_identity
from bridges.transport import ConnectionEvents, EnvelopeSink
from hub.envelope import Kind
from hub.errors import AuthError, DispatchError, RemoteProtocolError
from hub.metrics import Metrics
from hub.protocol.base import Codec, CodecFactory
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
from hub.uplink import (
    EVENT_KINDS,
    command_result_envelope,
    envelope_from_event,
    presence_envelope,
)

log = logging.getLogger(__name__)

_AUTH_REASONS = {
    "unknown_device": NakReason.UNKNOWN_DEVICE,
    "bad_credential": NakReason.BAD_CREDENTIAL,
}


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """What every connection of one listener shares; built once, at the listener's start."""

    codec_factory: CodecFactory
    #: The codec's name, the `protocol` of the envelopes.
    codec_name: str
    host: str
    max_frame_bytes: int
    max_payload_depth: int
    max_inflight: int
    hello_timeout_s: float
    idle_timeout_s: float
    max_connections: int
    sink: EnvelopeSink
    events: ConnectionEvents | None
    credentials: CredentialCache
    refresh_credentials: Callable[[str], Awaitable[None]]
    metrics: Metrics
    # Labelled children looked up once: `labels()` per message is measurable.
    received: Counter
    acked: Counter
    hello_timeouts: Counter
    idle_timeouts: Counter
    #: Counts (and rate-limits the log of) a connection refused at `max_connections`.
    refused_at_limit: Callable[[], None]
    #: The listener's open connections and its authenticated devices by id.
    connections: set[DeviceConnection]
    devices: dict[str, DeviceConnection]
    #: Tasks in flight (registry look-ups), held so they are not collected.
    background: set[asyncio.Future[None]]
    #: Whether a client certificate names the device (TLS listeners;
    #: bridges.tls.certificate_identity).
    tls_identity: IdentityMode = "off"
    #: The listener's limits per source address (None: all off).
    address_gate: AddressGate | None = None
    #: A TLS listener admits each socket's address itself, before the handshake.
    admitted_by_listener: bool = False


class DeviceConnection(asyncio.Protocol):
    """One device's TCP connection."""

    def __init__(self, ctx: ListenerContext) -> None:
        self._ctx = ctx
        # Made in connection_made once the connection is admitted: a refused
        # one costs no codec.
        self._codec: Codec
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
        #: In the listener's connection set (False when refused at the limit).
        self._admitted = False
        self._command_seq = 0
        self._commands_sent: set[str] = set()
        #: The device a verified client certificate names (TLS with tls_identity).
        self._certified: str | None = None
        self.peer = "?"
        #: The source address while it counts against the per-address limits.
        self._address: str | None = None
        #: Encoded ACKs of messages made durable, written together by `_flush_acks`.
        self._acks: list[bytes] = []

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        ctx = self._ctx
        gate = ctx.address_gate
        if gate is not None and peer:
            if ctx.admitted_by_listener or gate.admit(peer[0]):
                self._address = peer[0]
            else:
                self._closing = True
                self._transport.abort()
                return
        if len(ctx.connections) >= ctx.max_connections:
            # Over the limit: closed before a byte is read, so that the
            # descriptors left stay free for devices already connected, the
            # other listeners and /healthz.
            self._closing = True
            ctx.refused_at_limit()
            self._transport.abort()
            return
        self._admitted = True
        self._codec = ctx.codec_factory(
            Role.HUB,
            max_frame_bytes=ctx.max_frame_bytes,
            max_payload_depth=ctx.max_payload_depth,
        )
        ctx.connections.add(self)
        ctx.metrics.connections.labels("tcp").inc()
        loop = asyncio.get_running_loop()
        self._hello_handle = loop.call_later(ctx.hello_timeout_s, self._hello_deadline)
        self._arm_idle_timer(ctx.idle_timeout_s)
        if ctx.tls_identity != "off":
            peercert = self._transport.get_extra_info("peercert")
            self._certified = certificate_identity(peercert, ctx.tls_identity)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._ctx.sink.room.forget(self)
        for handle in (self._idle_handle, self._hello_handle):
            if handle is not None:
                handle.cancel()
        if self._address is not None:
            assert self._ctx.address_gate is not None
            self._ctx.address_gate.release(self._address)
            self._address = None
        if not self._admitted:
            return
        self._ctx.connections.discard(self)
        self._ctx.metrics.connections.labels("tcp").dec()
        if self.device_id is not None and self._ctx.devices.get(self.device_id) is self:
            del self._ctx.devices[self.device_id]
            self._presence(self.device_id, online=False, since=self.connected_at)
            if self._ctx.events is not None:
                self._ctx.events.device_disconnected(self.device_id)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return  # refused at accept; its transport is aborted
        self._last_activity = time.monotonic()
        self._codec.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return None
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
        # Paused (backpressure) means no further frame is handled either, not
        # only no further read: what the codec holds waits for `_maybe_resume`.
        while not self._closing and not self._authenticating and not self._paused:
            try:
                event = self._codec.next_event()
            except RemoteProtocolError as exc:
                self._refuse(exc.seq, NakReason(exc.code), str(exc))
                return
            if event is NEED_DATA:
                return
            # Data first and without a further call: it is nearly all the traffic.
            kind = EVENT_KINDS.get(type(event))
            if kind is not None:
                # A kind in EVENT_KINDS means a data event; mypy cannot see it.
                self._data(event, kind)  # type: ignore[arg-type]
            else:
                self._handle(event)

    def _handle(self, event: Any) -> None:
        if isinstance(event, Hello):
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
        if self._certified is not None and hello.device_id != self._certified:
            # The certificate names another device: the credential is not even
            # looked at (docs/security.md, "TCP over TLS").
            self._ctx.metrics.auth_failures.labels("tcp", "certificate_mismatch").inc()
            log.warning(
                "refused device %r from %s: its certificate names %r",
                hello.device_id,
                self.peer,
                self._certified,
            )
            self._auth_failed()
            self._refuse(hello.seq, NakReason.BAD_CREDENTIAL, "certificate_mismatch", count=False)
            return
        cache = self._ctx.credentials
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
        self._ctx.background.add(task)
        task.add_done_callback(self._ctx.background.discard)

    async def _refresh_then_verify(self, hello: Hello) -> None:
        try:
            await self._ctx.refresh_credentials(hello.device_id)
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
            self._ctx.credentials.verify(hello.device_id, hello.credential)
        except AuthError as exc:
            self._ctx.metrics.auth_failures.labels("tcp", exc.reason).inc()
            log.warning("refused device %r from %s: %s", hello.device_id, self.peer, exc.reason)
            self._auth_failed()
            self._refuse(hello.seq, _AUTH_REASONS[exc.reason], exc.reason, count=False)
            return
        self._accept(hello)

    def _auth_failed(self) -> None:
        """A refused credential slows down further connections from its address."""
        gate = self._ctx.address_gate
        if gate is not None and self._address is not None:
            gate.auth_failed(self._address)

    def _accept(self, hello: Hello) -> None:
        if self._hello_handle is not None:
            self._hello_handle.cancel()
            self._hello_handle = None
        self.device_id = hello.device_id
        self._boot_id = hello.boot_id
        previous = self._ctx.devices.get(hello.device_id)
        if previous is not None and previous is not self:
            # The device reconnected while its old socket still looks open (a
            # half-open connection): the newest one wins.
            log.info(
                "device %r reconnected from %s; closing its older connection",
                hello.device_id,
                self.peer,
            )
            previous._close()
        self._ctx.devices[hello.device_id] = self
        self._send(Ack(hello.seq))
        self.connected_at = datetime.now(UTC)
        self._presence(hello.device_id, online=True, since=self.connected_at)
        if self._ctx.events is not None:
            self._ctx.events.device_connected(hello.device_id, "tcp")

    def _data(self, event: Telemetry | DeviceEvent | StateReport, kind: Kind) -> None:
        device_id = self.device_id
        assert device_id is not None  # the codec refuses data before HELLO
        ctx = self._ctx
        ctx.received.inc()
        try:
            envelope = envelope_from_event(
                event, kind, device_id, self._boot_id, "tcp", ctx.codec_name
            )
            future = ctx.sink.submit(envelope)
        except Exception as exc:  # boundary: a bad payload or a stopped dispatcher
            ctx.metrics.invalid_payloads.labels("tcp").inc()
            log.warning("device %r seq %d refused: %s", device_id, event.seq, exc)
            self._send(Nak(event.seq, NakReason.BAD_PAYLOAD, str(exc)[:200]))
            return
        self._inflight += 1
        seq = event.seq
        future.add_done_callback(lambda f: self._durable(seq, f))
        if self._inflight >= ctx.max_inflight:
            self._pause()
        elif ctx.sink.room.full:
            # The hub holds its most envelopes: stop reading until the room
            # opens (bridges.backpressure); nothing is refused or dropped.
            self._pause()
            ctx.sink.room.call_when_open(self, self._maybe_resume)

    def _durable(self, seq: int, future: asyncio.Future[None]) -> None:
        self._inflight -= 1
        if future.cancelled() or future.exception() is not None:
            # Not durable (hub shutting down): no ACK, the device sends it again.
            return
        if not self._closing:
            self._queue_ack(seq)
        self._maybe_resume()

    def _queue_ack(self, seq: int) -> None:
        """ACK `seq` with the others confirmed in the same batch, in one write.

        The dispatcher resolves a batch's futures in one go, so their callbacks
        run back to back in one loop iteration; the flush scheduled by the
        first runs after the last. One write (one syscall) per connection per
        batch instead of one per message; the order stays the order of the
        callbacks, and any other frame flushes the queued ACKs first.
        """
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acks.append(self._codec.send(Ack(seq)))

    def _flush_acks(self) -> None:
        acks = self._acks
        if not acks:
            return
        self._acks = []
        if self._admitted and self._transport is not None and not self._transport.is_closing():
            self._ctx.acked.inc(len(acks))
            self._transport.write(b"".join(acks))

    def _command_result(self, event: CommandResult) -> None:
        device_id = self.device_id
        assert device_id is not None
        try:
            envelope = command_result_envelope(event, device_id, "tcp", self._ctx.codec_name)
            future = self._ctx.sink.submit(envelope)
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

    def _presence(self, device_id: str, *, online: bool, since: datetime) -> None:
        """Record a connect or disconnect of the connection accepted at `since` as a
        presence envelope (not acknowledged to anyone; ordered by hub/presence.py)."""
        with contextlib.suppress(DispatchError):  # shutting down: presence is best effort
            self._ctx.sink.submit(
                presence_envelope(
                    device_id,
                    online=online,
                    since=since,
                    transport="tcp",
                    protocol=self._ctx.codec_name,
                )
            )

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
            and self._inflight < self._ctx.max_inflight // 2 + 1
            and not self._transport.is_closing()
        ):
            room = self._ctx.sink.room
            if room.full:
                room.call_when_open(self, self._maybe_resume)
                return
            self._paused = False
            # Not reading was our own doing: the device's silence counts from now.
            self._last_activity = time.monotonic()
            self._transport.resume_reading()
            # Frames already received wait in the codec: the device may send
            # nothing more until they are acknowledged.
            asyncio.get_running_loop().call_soon(self._process)

    def _refuse(self, seq: int, reason: NakReason, message: str, *, count: bool = True) -> None:
        if count:
            self._ctx.metrics.protocol_errors.labels("tcp", reason.name.lower()).inc()
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
        if self._acks:
            self._flush_acks()  # queued ACKs were due first
        if self._admitted and self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._codec.send(event))

    def _close(self) -> None:
        self._flush_acks()  # what was made durable is acknowledged before the close
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
        self._ctx.hello_timeouts.inc()
        log.info(
            "closing %s: no accepted HELLO within %.1f s (hello_timeout_s)",
            self.peer,
            self._ctx.hello_timeout_s,
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
        timeout = self._ctx.idle_timeout_s
        idle = time.monotonic() - self._last_activity
        if idle < timeout:
            self._arm_idle_timer(timeout - idle)
            return
        if self._inflight:
            # Frames wait for the hub (not read meanwhile): not the device's silence.
            self._arm_idle_timer(timeout)
            return
        self._ctx.idle_timeouts.inc()
        log.info("closing %s (device %r): idle for %.1f s", self.peer, self.device_id, idle)
        self._abort()
