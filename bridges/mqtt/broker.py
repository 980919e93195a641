"""The embedded MQTT broker: amqtt running inside the hub's event loop, bridged in process.

Layer: bridges; imports the `hub` core, `bridges.transport`, the other
`bridges.mqtt` modules and amqtt.

`EmbeddedMqtt` is what the hub starts: the facade the composition root uses
(start, stop, port, serving, connected devices, publish, commands). Its
`HubBroker` is amqtt 0.12.1's `Broker` made of one class per concern, each
holding the overrides that concern needs (docs/mqtt.md, "What we override in
amqtt"): `SessionBroker` (bridges.mqtt.sessions, session takeover),
`ReachableBroker` (bridges.mqtt.reachability, command reachability),
`DeliveringBroker` (bridges.mqtt.delivery, subscriptions, QoS and offline
delivery) and `ListeningBroker` (bridges.mqtt.listener, the port and the
connection limit). Only this class sets their state.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace

from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.session import Session

from bridges.mqtt.auth import AclFileAccess, DeviceAccess, DeviceAuthPlugin, DeviceTopicPlugin
from bridges.mqtt.delivery import DeliveringBroker
from bridges.mqtt.handshakes import HandshakeGate
from bridges.mqtt.listener import (
    LIMIT_LOG_INTERVAL_S,
    ListeningBroker,
    bind_mqtt,
    bind_mqtt_tls,
    bind_mqtt_ws,
)
from bridges.mqtt.loop import MessageLoopBroker
from bridges.mqtt.reachability import ReachableBroker
from bridges.mqtt.sessions import SessionBroker
from bridges.mqtt.state import device_of
from bridges.mqtt.subscriptions import SubscriptionIndex, SubscriptionTable
from bridges.mqtt.tap import MqttUplink, TapConfig
from bridges.mqtt.websocket import PATH as WEBSOCKET_PATH
from bridges.tls import server_context
from bridges.transport import ConnectionEvents, EnvelopeSink
from hub.commands import PendingCommand
from hub.errors import EnvelopeError
from hub.metrics import Metrics
from hub.registry import CredentialCache
from hub.settings import Settings
from hub.topics import PayloadLimits, command_message, command_topic

log = logging.getLogger(__name__)

_LISTENER = "default"
#: MQTT over TLS: a second listener of the same broker (bridges.mqtt.listener).
_TLS_LISTENER = "tls"
#: MQTT over WebSockets and secure WebSockets: two more listeners of the same broker.
_WS_LISTENER = "ws"
_WSS_LISTENER = "wss"


def _plugin_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class HubBroker(
    SessionBroker, ReachableBroker, MessageLoopBroker, DeliveringBroker, ListeningBroker
):
    """amqtt's broker with the hub's overrides; see the module docstring."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        listen_sockets: dict[str, socket.socket],
        ssl_contexts: dict[str, ssl.SSLContext],
        websocket_listeners: frozenset[str],
        tap: TapConfig,
        max_packet_bytes: int,
        connect_timeout_s: float,
        max_topic_levels: int,
        max_connections: int,
        max_handshakes: int,
        max_queued_messages: int,
        metrics: Metrics,
        topic_root: str,
        access: DeviceAccess,
        events: ConnectionEvents | None = None,
    ) -> None:
        super().__init__(config)
        self._access = access
        self._topic_root = topic_root
        self._events = events
        self._metrics = metrics
        # The fast path of each connection asks this broker's subscription index.
        self._tap = replace(tap, subscribed=self.has_subscribers)
        self._room = tap.uplink.room
        # bridges.mqtt.listener
        self._listen_sockets = listen_sockets
        self._ssl_contexts = ssl_contexts
        self._websocket_listeners = websocket_listeners
        self._default_listener = _LISTENER
        self._max_packet_bytes = max_packet_bytes
        self._connect_timeout_s = connect_timeout_s
        self._max_topic_levels = max_topic_levels
        self._max_connections = max_connections
        self._open_connections = 0
        self._handshakes = HandshakeGate(max_handshakes)
        self._limit_refusals = metrics.connections_refused.labels("mqtt", "connection_limit")
        self._limit_logged_at = -LIMIT_LOG_INTERVAL_S  # the first refusal is logged
        self._limit_unlogged = 0
        self._address_gate = access.address_gate
        # bridges.mqtt.delivery
        self._max_queued = max_queued_messages
        self._subscriptions: SubscriptionTable[list[tuple[Session, int]]] = SubscriptionTable()
        self._index = SubscriptionIndex()
        self._subscribed_topics = {}
        self._filters_of = {}
        # bridges.mqtt.reachability
        self._reachable = {}
        # bridges.mqtt.sessions
        self._claims = {}

    # -- for EmbeddedMqtt ---------------------------------------------------------

    async def disconnect_device(self, device_id: str) -> int:
        """Close every connection authenticated as the device; how many there were."""
        closed = 0
        for session, handler in list(self._sessions.values()):
            if device_of(session) == device_id and session.transitions.is_connected():
                await self._stop_handler(handler)
                closed += 1
        return closed

    def connected_devices(self) -> int:
        return sum(
            1
            for session, _ in list(self._sessions.values())
            if session.transitions.is_connected() and device_of(session)
        )


class EmbeddedMqtt:
    """The MQTT broker embedded in the hub, bridged to the dispatcher (a
    `bridges.transport.CommandTransport` and `ListeningTransport`)."""

    #: The transport's name in logs, metrics and status.
    name = "mqtt"

    def __init__(
        self,
        settings: Settings,
        dispatcher: EnvelopeSink,
        credentials: CredentialCache,
        refresh_credentials: Callable[[str], Awaitable[None]],
        metrics: Metrics,
        *,
        events: ConnectionEvents | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._events = events
        self._background: set[asyncio.Future[None]] = set()
        # Without an ACL file the plain rules, so that the file costs nothing then.
        self._access = (
            DeviceAccess(settings, credentials, refresh_credentials, metrics)
            if settings.mqtt_acl_file is None
            else AclFileAccess(
                settings, credentials, refresh_credentials, metrics, settings.mqtt_acl_file
            )
        )
        self._tap = TapConfig(
            uplink=MqttUplink(
                dispatcher,
                metrics,
                settings.mqtt_topic_root,
                PayloadLimits(settings.max_payload_depth, settings.max_payload_bytes),
            ),
            metrics=metrics,
            max_inflight=settings.max_inflight_per_connection,
            acl=self._access if settings.mqtt_acl_file is not None else None,
        )
        self._broker: HubBroker | None = None
        #: The SSL context of each TLS listener; the broker reads this very dict
        #: at each handshake, so `use_tls_context` changes it in place.
        self._ssl_contexts: dict[str, ssl.SSLContext] = {}

    async def start(self) -> None:
        """Bind `host`:`mqtt_port` (0: a free port), `mqtt_tls_port` when TLS
        is on, `mqtt_ws_port` and `mqtt_wss_port` unless off, and start
        accepting devices. A bad TLS file is a ConfigError raised before any
        port is bound."""
        settings = self._settings
        host = settings.host
        # The same dict stays the broker's, so a SIGHUP reload (`use_tls_context`)
        # reaches the listeners' next handshakes.
        contexts = self._ssl_contexts
        contexts.clear()
        if settings.mqtt_tls_enabled or settings.mqtt_wss_enabled:
            # One context for both TLS listeners: the same files, read once.
            context = server_context(settings)
            if settings.mqtt_tls_enabled:
                contexts[_TLS_LISTENER] = context
            if settings.mqtt_wss_enabled:
                contexts[_WSS_LISTENER] = context
        sockets = {_LISTENER: await bind_mqtt(host, settings.mqtt_port)}
        try:
            if settings.mqtt_tls_enabled:
                sockets[_TLS_LISTENER] = await bind_mqtt_tls(host, settings.mqtt_tls_port)
            if settings.mqtt_ws_port != 0:
                sockets[_WS_LISTENER] = await bind_mqtt_ws(host, settings.mqtt_ws_port, tls=False)
            if settings.mqtt_wss_enabled:
                sockets[_WSS_LISTENER] = await bind_mqtt_ws(host, settings.mqtt_wss_port, tls=True)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        websockets = frozenset(sockets) & {_WS_LISTENER, _WSS_LISTENER}
        shown_host = f"[{host}]" if ":" in host else host
        plugin_config = {"access": self._access}
        config = BrokerConfig(
            listeners={
                name: ListenerConfig(
                    type=ListenerType.WS if name in websockets else ListenerType.TCP,
                    bind=f"{shown_host}:{sock.getsockname()[1]}",
                )
                for name, sock in sockets.items()
            },
            plugins={
                _plugin_path(DeviceAuthPlugin): plugin_config,
                _plugin_path(DeviceTopicPlugin): plugin_config,
            },
        )
        broker = HubBroker(
            config,
            listen_sockets=sockets,
            ssl_contexts=contexts,
            websocket_listeners=websockets,
            tap=self._tap,
            max_packet_bytes=self._settings.mqtt_max_packet_bytes,
            connect_timeout_s=self._settings.mqtt_connect_timeout_s,
            max_topic_levels=self._settings.mqtt_max_topic_levels,
            max_connections=self._settings.mqtt_max_connections,
            max_handshakes=self._settings.mqtt_max_handshakes,
            max_queued_messages=self._settings.mqtt_max_queued_messages,
            metrics=self._metrics,
            topic_root=self._settings.mqtt_topic_root,
            access=self._access,
            events=self._events,
        )
        try:
            await broker.start()
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        self._broker = broker
        log.info(
            "MQTT broker listening on %s:%d (topics under %s/, anonymous %s, ACL file %s)",
            host,
            broker.port,
            settings.mqtt_topic_root,
            "allowed" if settings.mqtt_allow_anonymous else "refused",
            settings.mqtt_acl_file or "none",
        )
        for name, what in ((_WS_LISTENER, "WebSockets"), (_WSS_LISTENER, "secure WebSockets")):
            if name in sockets:
                log.info(
                    "MQTT over %s listening on %s:%d (path %s)",
                    what,
                    host,
                    broker.listener_port(name),
                    WEBSOCKET_PATH,
                )
        if settings.mqtt_password_file is not None and settings.mqtt_acl_file is None:
            log.warning(
                "mqtt_password_file is set without mqtt_acl_file: its service users may "
                "connect but neither publish nor subscribe (only the ACL file grants them rights)"
            )
        if _TLS_LISTENER in contexts:
            log.info(
                "MQTT over TLS listening on %s:%d (client certificate %s, identity %s)",
                host,
                broker.listener_port(_TLS_LISTENER),
                "required" if settings.tls_require_certificate else "optional",
                settings.tls_identity,
            )

    @property
    def port(self) -> int:
        """The bound port (the real one when `mqtt_port` was 0)."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not started")
        return self._broker.port

    @property
    def tls_port(self) -> int | None:
        """The port of MQTT over TLS; None when it is off."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not started")
        return self._broker.listener_port(_TLS_LISTENER)

    @property
    def ws_port(self) -> int | None:
        """The port of MQTT over WebSockets; None when it is off."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not started")
        return self._broker.listener_port(_WS_LISTENER)

    @property
    def wss_port(self) -> int | None:
        """The port of MQTT over secure WebSockets; None when it is off."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not started")
        return self._broker.listener_port(_WSS_LISTENER)

    @property
    def serving(self) -> bool:
        """True between start and stop (for /readyz)."""
        return self._broker is not None

    @property
    def connected_devices(self) -> int:
        """Authenticated devices connected now."""
        return self._broker.connected_devices() if self._broker is not None else 0

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish to the broker's subscribers (command downlink). Returns once the
        message is queued for delivery, not when subscribers acknowledged it."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not started")
        await self._broker.internal_message_broadcast(topic, payload, qos)

    def deliver_command(self, command: PendingCommand) -> bool:
        """Publish a command to its device (QoS 1) if the device is connected here
        and subscribed to its command topic; False otherwise (bridges.downlink
        then leaves it pending for the device's next connect)."""
        broker = self._broker
        if broker is None or not broker.reachable(command.device_id):
            return False
        try:
            topic = command_topic(self._settings.mqtt_topic_root, command.device_id)
            payload = command_message(command.id, command.name, command.args)
        except (EnvelopeError, TypeError, ValueError) as exc:
            log.error("command %s cannot be sent over MQTT: %s", command.id, exc)
            return False
        task = asyncio.ensure_future(broker.internal_message_broadcast(topic, payload, 1))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    def use_tls_context(self, context: ssl.SSLContext) -> None:
        """Serve the TLS handshakes that follow with `context` (SIGHUP reloaded
        the TLS files); connections already up keep theirs."""
        for name in self._ssl_contexts:
            self._ssl_contexts[name] = context

    def reload_access(self) -> None:
        """Read `mqtt_acl_file` and `mqtt_password_file` again (SIGHUP), keeping
        every connection; what is in force stays when a file no longer parses.
        Nothing without either file."""
        self._access.reload()

    async def disconnect_device(self, device_id: str) -> int:
        """Drop the device's connections (it was re-keyed or removed)."""
        return await self._broker.disconnect_device(device_id) if self._broker is not None else 0

    async def stop(self) -> None:
        """Close every connection and the listener. Messages still waiting to be
        durable are not acknowledged; their devices send them again."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
