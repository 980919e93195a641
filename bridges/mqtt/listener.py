"""The embedded broker's listener: binding its port, accepting and limiting connections.

Layer: bridges; imports the `hub` core, `bridges.listen`, `bridges.address_gate`,
the other `bridges.mqtt` modules and amqtt.

- `bind_mqtt` binds `host`:`mqtt_port` (and `bind_mqtt_tls` `mqtt_tls_port`,
  `bind_mqtt_ws` `mqtt_ws_port` and `mqtt_wss_port`) through
  `bridges.listen.bind`, so a port in use is a `ConfigError` naming the
  setting (and the way to bridge from the broker holding it), not an amqtt
  traceback.
- `ListeningBroker` is amqtt's `Broker` with these overrides:
  `_create_server_instance` serves the socket bound for each listener, with
  the listener's SSL context if it has one (MQTT over TLS: the same broker,
  limits, authentication and ACL; `_TlsAcceptor` accepts its sockets, and
  the TLS handshake, after the connection limits, has
  `mqtt_connect_timeout_s`, uses the context in force at its accept (SIGHUP
  replaces it) and is counted when it fails, `tls_handshake`); `stream_connected` closes at once
  (counted) a connection refused by the limits per source address
  (bridges.address_gate, docs/security.md) or beyond `mqtt_max_connections`,
  and reads the
  others through a `PacketReader` (bridges.mqtt.reader: whole, checked
  packets; size limit; CONNECT timeout; keep-alive at 1.5x) and always closes
  the socket at the end (stock amqtt leaves it open when the first packet is
  bad). Once its CONNECT is read, each connection waits for a place in the
  `HandshakeGate` (bridges.mqtt.handshakes, `mqtt_max_handshakes`) before
  amqtt handles it; the session code gives the place back once the CONNACK
  is written; one whose device
  closed it while it waited is closed without a handshake (`abandoned`).
- MQTT over WebSockets (ws and wss) takes the same path: the listener is
  ours, not amqtt's (which would run the `websockets` server and its TLS
  before any limit); after the limits and the TLS handshake,
  `bridges.mqtt.websocket` runs the WebSocket opening handshake (within
  `mqtt_connect_timeout_s`, a failure counted as `ws_handshake`) and the
  `PacketReader` reads the payload of its binary frames.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from functools import partial
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from prometheus_client import Counter

from bridges.address_gate import AddressGate
from bridges.backpressure import Room
from bridges.listen import PortSetting, bind
from bridges.mqtt.handshakes import HandshakeGate
from bridges.mqtt.lean import lean_drain_waiters
from bridges.mqtt.reader import ByteStream, PacketReader
from bridges.mqtt.websocket import HandshakeFailed, WebSocketStream, WebSocketWriter
from hub.metrics import Metrics
from hub.mqtt_rules import ProtocolViolation

log = logging.getLogger(__name__)

BACKLOG = 4096
#: At most one log line per this many seconds about connections refused at the limit.
LIMIT_LOG_INTERVAL_S = 10.0
_PORT_SETTING = PortSetting(
    what="MQTT",
    key="mqtt_port",
    env="HUB_MQTT_PORT",
    hint="(another broker such as Mosquitto?)",
    alternative="or bridge from that broker with mqtt_external_url / HUB_MQTT_EXTERNAL_URL",
)

_TLS_PORT_SETTING = PortSetting(
    what="MQTT over TLS",
    key="mqtt_tls_port",
    env="HUB_MQTT_TLS_PORT",
    hint="(another broker such as Mosquitto?)",
    alternative="or turn it off with 0",
)


_WS_PORT_SETTING = PortSetting(
    what="MQTT over WebSockets",
    key="mqtt_ws_port",
    env="HUB_MQTT_WS_PORT",
    hint="(another broker or web server?)",
    alternative="or turn it off with 0",
)

_WSS_PORT_SETTING = PortSetting(
    what="MQTT over secure WebSockets",
    key="mqtt_wss_port",
    env="HUB_MQTT_WSS_PORT",
    hint="(another broker or web server?)",
    alternative="or turn it off with 0",
)


async def bind_mqtt(host: str, port: int) -> socket.socket:
    """Bind the broker's listening socket (0: a free port); a busy port is a ConfigError."""
    return await bind(host, port, _PORT_SETTING, backlog=BACKLOG)


async def bind_mqtt_tls(host: str, port: int) -> socket.socket:
    """Bind the socket of MQTT over TLS; a busy port is a ConfigError naming mqtt_tls_port."""
    return await bind(host, port, _TLS_PORT_SETTING, backlog=BACKLOG)


async def bind_mqtt_ws(host: str, port: int, *, tls: bool) -> socket.socket:
    """Bind the socket of MQTT over WebSockets (`tls`: wss); a busy port is a
    ConfigError naming mqtt_ws_port or mqtt_wss_port."""
    return await bind(host, port, _WSS_PORT_SETTING if tls else _WS_PORT_SETTING, backlog=BACKLOG)


class ListeningBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker on a socket bound by the hub; see the module docstring.
    `bridges.mqtt.broker.HubBroker` sets the attributes below."""

    #: The socket bound for each listener name, and the SSL context of a TLS one.
    _listen_sockets: dict[str, socket.socket]
    _ssl_contexts: dict[str, ssl.SSLContext]
    #: The listeners that speak MQTT inside WebSocket frames (ws, wss).
    _websocket_listeners: frozenset[str]
    _default_listener: str
    _metrics: Metrics
    _max_packet_bytes: int
    _connect_timeout_s: float
    _max_topic_levels: int
    _max_connections: int
    _open_connections: int
    _limit_refusals: Counter
    _limit_logged_at: float
    _limit_unlogged: int
    #: Limits per source address (None: all off); `DeviceAccess` counts failed logins in it.
    _address_gate: AddressGate | None
    #: Bounds the handshakes in progress (`mqtt_max_handshakes`).
    _handshakes: HandshakeGate
    #: The dispatcher's room: no device packet is read while it is full.
    _room: Room | None

    @property
    def port(self) -> int:
        return int(self._listen_sockets[self._default_listener].getsockname()[1])

    def listener_port(self, listener_name: str) -> int | None:
        """The port a listener is bound to; None when the broker has no such listener."""
        sock = self._listen_sockets.get(listener_name)
        return None if sock is None else int(sock.getsockname()[1])

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        if listener_type not in (ListenerType.TCP, ListenerType.WS):
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )
        # amqtt builds no context (the listener has no "ssl" key): the hub's own
        # (bridges.tls) is used by `_TlsAcceptor`, so the TLS handshake comes
        # after the connection limits and its failures are counted. A
        # WebSocket listener is served here too (not by amqtt's `websockets`
        # server), for the same reason; wss is a TLS listener like mqtt-tls.
        if listener_name in self._ssl_contexts:
            return _TlsAcceptor(self, listener_name)
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            sock=self._listen_sockets[listener_name],
            backlog=BACKLOG,
        )

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        gate = self._address_gate
        host: str | None = None
        if gate is not None:
            peer = writer.get_extra_info("peername")
            if peer:
                if not gate.admit(peer[0]):
                    writer.transport.abort()
                    return
                host = peer[0]
        try:
            await self._admitted(reader, writer, listener_name)
        finally:
            if host is not None:
                assert gate is not None
                gate.release(host)

    async def _admitted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        if self._open_connections >= self._max_connections:
            # Closed before a byte is read: the descriptors left stay free for
            # the clients already connected, the other listeners and /healthz.
            self._refused_at_limit()
            writer.transport.abort()
            return
        self._open_connections += 1
        try:
            await self._serve_stream(reader, writer, listener_name)
        finally:
            self._open_connections -= 1

    def _refused_at_limit(self) -> None:
        """Count a connection closed at `mqtt_max_connections`; log at most one
        line per interval, so a flood of connections cannot flood the log."""
        self._limit_refusals.inc()
        self._limit_unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._limit_logged_at >= LIMIT_LOG_INTERVAL_S:
            log.warning(
                "MQTT: %d connection(s) refused, %d open is the limit "
                "(mqtt_max_connections / HUB_MQTT_MAX_CONNECTIONS)",
                self._limit_unlogged,
                self._max_connections,
            )
            self._limit_logged_at = now
            self._limit_unlogged = 0

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        if listener_name not in self._websocket_listeners:
            await self._serve(reader, StreamWriterAdapter(writer), writer, listener_name, None)
            return
        ws = WebSocketStream(reader, writer, max_packet_bytes=self._max_packet_bytes)
        try:
            await ws.open(self._connect_timeout_s)
        except (HandshakeFailed, OSError, TimeoutError) as exc:
            # Counted and logged at DEBUG like a failed TLS handshake: a scan
            # or a browser pointed at the port must not flood the log.
            self._metrics.connections_refused.labels("mqtt", "ws_handshake").inc()
            log.debug("MQTT over WebSockets: handshake with %s failed: %r", _peer(writer), exc)
            writer.close()  # after the HTTP answer, if there is one
            return
        await self._serve(ws, WebSocketWriter(writer, ws), writer, listener_name, ws)

    async def _serve(
        self,
        source: ByteStream,
        adapter: StreamWriterAdapter,
        writer: asyncio.StreamWriter,
        listener_name: str,
        ws: WebSocketStream | None,
    ) -> None:
        """amqtt's session over `source` read through a `PacketReader`; `ws`
        when the packets travel in WebSocket frames. Its CONNECT is read
        first (within the CONNECT timeout), and handled only once the
        connection has a place among the handshakes in progress."""
        peer_text = _peer(writer)
        lean_drain_waiters(writer)
        packets = PacketReader(
            source,
            max_packet_bytes=self._max_packet_bytes,
            connect_timeout_s=self._connect_timeout_s,
            max_topic_levels=self._max_topic_levels,
            peer=peer_text,
            reply=writer.write if ws is None else ws.send,
            on_violation=self._violation if ws is None else partial(self._ws_violation, ws),
            room=self._room,
        )
        try:
            await packets.prefetch()
            async with self._handshakes.enter() as waited:
                if waited and getattr(source, "_eof", False):
                    # Its device closed the connection while it waited (gave up
                    # waiting for a CONNACK): no handshake for nobody.
                    self._metrics.connections_refused.labels("mqtt", "abandoned").inc()
                    return
                await self._client_connected(listener_name, packets, adapter)
        except ConnectionError as exc:
            # The client went away during its handshake (a probe that only
            # wanted the certificate, a reset): its end, not a failure of ours.
            log.debug("MQTT connection from %s ended early: %r", peer_text, exc)
        except Exception:
            # The boundary with amqtt: one connection's failure stays with it.
            self._metrics.protocol_errors.labels("mqtt", "internal_error").inc()
            log.exception("MQTT connection from %s failed", peer_text)
        finally:
            # Stock amqtt leaves the socket open when the first packet is not a
            # CONNECT or the CONNECT is refused early; every connection ends here.
            if ws is not None:
                ws.close()
            writer.close()

    def _ws_violation(self, ws: WebSocketStream, violation: ProtocolViolation, peer: str) -> None:
        ws.violation()
        self._violation(violation, peer)

    def _violation(self, violation: ProtocolViolation, peer: str) -> None:
        self._metrics.protocol_errors.labels("mqtt", violation.reason).inc()
        log.warning("MQTT client %s: %s; closing the connection", peer, violation)


class _TlsAcceptor:
    """The accept loop of a TLS listener, in place of `asyncio.Server` (amqtt
    only closes it): a socket refused by its address's limits or beyond
    `mqtt_max_connections` is closed before any TLS work, and an admitted one
    gets its handshake from `loop.connect_accepted_socket`, as TCP over TLS
    does (bridges.tcp). Not `StreamWriter.start_tls` on an accepted stream:
    under uvloop that handshake often never completes."""

    def __init__(self, broker: ListeningBroker, listener_name: str) -> None:
        self._broker = broker
        self._name = listener_name
        self._sock = broker._listen_sockets[listener_name]
        self._sock.setblocking(False)
        #: Connections still in their TLS handshake (cancelled by `close`).
        self._handshakes: set[asyncio.Future[None]] = set()
        self._logged_at = -LIMIT_LOG_INTERVAL_S
        self._loop = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        try:
            await self._accept_until_closed()
        finally:
            self._sock.close()  # as `asyncio.Server.close` closes its socket

    async def _accept_until_closed(self) -> None:
        loop = asyncio.get_running_loop()
        broker, gate = self._broker, self._broker._address_gate
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors: let some close first
                now = loop.time()
                if now - self._logged_at >= LIMIT_LOG_INTERVAL_S:
                    log.warning("MQTT over TLS: accept failed: %s", exc)
                    self._logged_at = now
                await asyncio.sleep(0.1)
                continue
            host = str(address[0])
            if gate is not None and not gate.admit(host):
                conn.close()  # counted by the gate
                continue
            if broker._open_connections >= broker._max_connections:
                conn.close()
                if gate is not None:
                    gate.release(host)
                broker._refused_at_limit()
                continue
            broker._open_connections += 1
            task = asyncio.ensure_future(self._connection(conn, host))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _connection(self, conn: socket.socket, host: str) -> None:
        """One admitted socket: the server side of the handshake within
        `mqtt_connect_timeout_s`, with the SSL context in force now (SIGHUP may
        replace it), then the MQTT stream. A failed handshake (no TLS, a client
        certificate refused: another CA, expired, revoked) is counted, logged
        at DEBUG (a scan must not flood the log) and closes the socket."""
        broker = self._broker
        task = asyncio.current_task()
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol,
                    conn,
                    ssl=broker._ssl_contexts[self._name],
                    ssl_handshake_timeout=broker._connect_timeout_s,
                )
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                broker._metrics.connections_refused.labels("mqtt", "tls_handshake").inc()
                log.debug("MQTT over TLS: handshake with %s failed: %s", host, exc)
                conn.close()
                return
            except asyncio.CancelledError:
                conn.close()  # the listener closed during the handshake
                raise
            # Past the handshake: amqtt owns the connection now (and closes it).
            self._handshakes.discard(task)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await broker._serve_stream(reader, writer, self._name)
        finally:
            broker._open_connections -= 1
            if broker._address_gate is not None:
                broker._address_gate.release(host)

    def close(self) -> None:
        self._loop.cancel()
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._loop, return_exceptions=True)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
