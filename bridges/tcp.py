"""The TCP bridge: one listener per configured port and codec, in and out of envelopes.

Layer: bridges; imports the `hub` core and `bridges.transport`, `bridges.listen`,
`bridges.tls`, `bridges.address_gate` and `bridges.tcp_connection` only.

One `TcpServer` per configured listener (port + codec). It binds through
`bridges.listen.bind`, so that a busy port is an error naming `tcp_port /
HUB_TCP_PORT`, builds one frozen `ListenerContext` and hands it to each
`DeviceConnection` (bridges/tcp_connection.py), which moves the bytes and
applies docs/protocol.md, "Connection lifecycle".

Hostile or broken peers cannot hold descriptors (docs/protocol.md, "Deadlines
and limits of the hub"): a connection has `hello_timeout_s` from its accept to
an accepted HELLO, and bytes that trickle in do not extend it; the idle
timeout is one timer per connection, armed for the exact moment the silence
reaches `idle_timeout_s`; and beyond `tcp_max_connections` open connections a
new one is closed as soon as it is accepted. Each of these is counted.
So is a socket refused by the limits per source address (bridges.address_gate,
docs/security.md, "Limits per source address"), checked first of all.

A listener with `tls = true` speaks the same codec over TLS, with the SSL
context of MQTT over TLS (`bridges.tls.server_context`). It accepts the
sockets itself: a socket refused by its address's limits, or beyond
`tcp_max_connections` (connections and handshakes in progress together), is
closed before any TLS work, and an
admitted one gets its handshake (`loop.connect_accepted_socket`) within
`hello_timeout_s`, with the context in force at its accept (SIGHUP replaces
it: `use_tls_context`). A failed handshake is counted
(`hub_connections_refused_total{reason="tls_handshake"}`) and closes only that
socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from bridges.address_gate import AddressGate
from bridges.listen import PortSetting, bind
from bridges.tcp_connection import DeviceConnection, ListenerContext
from bridges.tls import server_context
from bridges.transport import ConnectionEvents, EnvelopeSink
from hub.commands import PendingCommand
from hub.errors import ConfigError
from hub.metrics import Metrics
from hub.protocol.base import CodecFactory
from hub.protocol.discovery import load_codec
from hub.registry import CredentialCache
from hub.settings import Settings, TcpListener

__all__ = [
    "CONNECTION_LIMIT",
    "HELLO_TIMEOUT",
    "IDLE_TIMEOUT",
    "TLS_HANDSHAKE",
    "DeviceConnection",
    "ListenerContext",
    "TcpServer",
    "listener_ssl_context",
]

log = logging.getLogger(__name__)

#: Reasons, the `reason` label of hub_protocol_errors_total / hub_connections_refused_total.
HELLO_TIMEOUT = "hello_timeout"
IDLE_TIMEOUT = "idle_timeout"
CONNECTION_LIMIT = "connection_limit"
TLS_HANDSHAKE = "tls_handshake"
#: At most one log line per this many seconds about connections refused at the limit.
_LIMIT_LOG_INTERVAL_S = 10.0


def listener_ssl_context(settings: Settings, listener: TcpListener) -> ssl.SSLContext | None:
    """The SSL context of a `tls = true` listener (None for one in the clear); a
    one-line ConfigError when the hub's TLS settings cannot serve it."""
    if not listener.tls:
        return None
    if settings.tls_cert_file is None:
        raise ConfigError(
            f"tcp_listeners: the {listener.codec} listener on port {listener.port} has "
            "tls = true, but setting 'tls_cert_file' (HUB_TLS_CERT_FILE) is not set",
            key="tcp_listeners",
        )
    return server_context(settings)


class TcpServer:
    """One listener: a port and the codec it speaks (a `bridges.transport.CommandTransport`
    and `ListeningTransport`)."""

    #: The transport's name in logs, metrics and status.
    name = "tcp"

    def __init__(
        self,
        settings: Settings,
        listener: TcpListener,
        dispatcher: EnvelopeSink,
        credentials: CredentialCache,
        refresh_credentials: Callable[[str], Awaitable[None]],
        metrics: Metrics,
        events: ConnectionEvents | None = None,
    ) -> None:
        self.host = listener.host or settings.host
        self.requested_port = listener.port
        self.codec_name = listener.codec
        self.codec_factory: CodecFactory = load_codec(listener.codec)
        self.tls = listener.tls
        self.max_connections = settings.tcp_max_connections
        self._limit_refusals = metrics.connections_refused.labels("tcp", CONNECTION_LIMIT)
        self._limit_logged_at = -_LIMIT_LOG_INTERVAL_S
        self._limit_unlogged = 0
        self.connections: set[DeviceConnection] = set()
        self.devices: dict[str, DeviceConnection] = {}
        self.background: set[asyncio.Future[None]] = set()
        gate = AddressGate(settings, metrics, "tcp")
        self._gate = gate if gate.active else None
        self.context = ListenerContext(
            codec_factory=self.codec_factory,
            codec_name=self.codec_name,
            host=self.host,
            max_frame_bytes=settings.max_frame_bytes,
            max_payload_depth=settings.max_payload_depth,
            max_inflight=settings.max_inflight_per_connection,
            hello_timeout_s=settings.hello_timeout_s,
            idle_timeout_s=settings.idle_timeout_s,
            max_connections=self.max_connections,
            sink=dispatcher,
            events=events,
            credentials=credentials,
            refresh_credentials=refresh_credentials,
            metrics=metrics,
            received=metrics.messages_received.labels("tcp"),
            acked=metrics.messages_acked.labels("tcp"),
            # Deadlines of many connections can pass in one loop iteration.
            hello_timeouts=metrics.protocol_errors.labels("tcp", HELLO_TIMEOUT),
            idle_timeouts=metrics.protocol_errors.labels("tcp", IDLE_TIMEOUT),
            refused_at_limit=self.refused_at_limit,
            connections=self.connections,
            devices=self.devices,
            background=self.background,
            tls_identity=settings.tls_identity if listener.tls else "off",
            address_gate=self._gate,
            admitted_by_listener=listener.tls,
        )
        self._server: asyncio.Server | None = None
        self._ssl = listener_ssl_context(settings, listener)
        self._handshake_failures = metrics.connections_refused.labels("tcp", TLS_HANDSHAKE)
        #: A TLS listener's socket, its accept loop and the handshakes in progress.
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accept_logged_at = -_LIMIT_LOG_INTERVAL_S

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
        if self._sock is not None:
            return int(self._sock.getsockname()[1])
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def serving(self) -> bool:
        """True while the listener accepts connections (for /readyz)."""
        if self._accepting is not None:
            return not self._accepting.done()
        return self._server is not None and self._server.is_serving()

    @property
    def handshakes_in_progress(self) -> int:
        """TLS handshakes under way (they count against `tcp_max_connections`)."""
        return len(self._handshakes)

    async def start(self) -> None:
        sock = await bind(
            self.host,
            self.requested_port,
            PortSetting(
                "TCP over TLS" if self.tls else "TCP",
                "tcp_port",
                "HUB_TCP_PORT",
                f"(the {self.codec_name} listener; every listener and its port can be "
                "set with tcp_listeners in the configuration file)",
            ),
        )
        if self._ssl is not None:
            self._sock = sock
            self._accepting = asyncio.ensure_future(self._accept_tls(sock))
            return
        context = self.context
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: DeviceConnection(context), sock=sock
            )
        except BaseException:
            sock.close()
            raise

    def use_tls_context(self, ssl_context: ssl.SSLContext) -> None:
        """Serve the handshakes that follow with `ssl_context` (SIGHUP reloaded
        the TLS files); connections already up keep theirs. Nothing in the clear."""
        if self._ssl is not None:
            self._ssl = ssl_context

    async def _accept_tls(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors: let some close first
                now = time.monotonic()
                if now - self._accept_logged_at >= _LIMIT_LOG_INTERVAL_S:
                    log.warning("TCP over TLS port %d: accept failed: %s", self.port, exc)
                    self._accept_logged_at = now
                await asyncio.sleep(0.1)
                continue
            host = str(address[0])
            gate = self._gate
            if gate is not None and not gate.admit(host):
                conn.close()  # before any TLS work, counted by the gate
                continue
            if len(self.connections) + len(self._handshakes) >= self.max_connections:
                # Closed before a byte is read: a flood costs no TLS work.
                conn.close()
                if gate is not None:
                    gate.release(host)
                self.refused_at_limit()
                continue
            # The context in force now: a reload (SIGHUP) may have replaced it.
            assert self._ssl is not None
            task = asyncio.ensure_future(self._handshake(conn, self._ssl, host))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, ssl_context: ssl.SSLContext, host: str) -> None:
        """The server side of one TLS handshake; then the socket is a DeviceConnection."""
        context = self.context
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: DeviceConnection(context),
                conn,
                ssl=ssl_context,
                ssl_handshake_timeout=context.hello_timeout_s,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            # No TLS, a refused client certificate, or none within the timeout;
            # logged at DEBUG only, so that a scan cannot flood the log.
            self._handshake_failures.inc()
            log.debug("TCP over TLS: handshake failed: %s", exc)
            conn.close()
            if self._gate is not None:
                self._gate.release(host)
        except asyncio.CancelledError:
            if self._gate is not None:
                self._gate.release(host)
            raise

    @property
    def connected_devices(self) -> int:
        """Authenticated devices connected to this listener now."""
        return len(self.devices)

    def deliver_command(self, command: PendingCommand) -> bool:
        """Hand the command to its device if the device is connected here."""
        connection = self.devices.get(command.device_id)
        if connection is None:
            return False
        return connection.send_command(command.id, command.name, command.args)

    async def disconnect_device(self, device_id: str) -> int:
        """Close the device's connection if it is held here (re-keyed or removed);
        how many were closed (0 or 1)."""
        connection = self.devices.get(device_id)
        if connection is None:
            return 0
        connection._close()
        return 1

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            for task in list(self._handshakes):
                task.cancel()
            await asyncio.gather(self._accepting, *self._handshakes, return_exceptions=True)
            self._accepting = None
            for connection in list(self.connections):
                connection._close()
            if self._sock is not None:
                self._sock.close()
            return
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection._close()
        await self._server.wait_closed()
        self._server = None
