"""The embedded MQTT broker: amqtt running inside the hub's event loop, bridged in process.

Layer: bridges; imports the `hub` core, the other `bridges.mqtt_*` modules and
amqtt. Must not import `tasks`, `firmware_sim`, `hub.cli` or `hub.app`.

`EmbeddedMqtt` is what the hub starts. `HubBroker` is amqtt's `Broker` with
these overrides (amqtt is pinned to 0.12.1 because they touch its internals):

- `_initialize_client_session`: every connection gets a `BridgingHandler`
  (bridges.mqtt_bridge_plugin), which bridges device publishes and sends the
  PUBACK only once the message is durable.
- `stream_connected`: wraps the connection's reader in a `FramedReader`
  (packet size limit, backpressure), closes connections that send no CONNECT
  within `mqtt_connect_timeout_s`, and always closes the socket at the end
  (stock amqtt leaves it open on some failed handshakes).
- `_create_server_instance`: listens on a socket this module bound itself, so a
  port in use is a `ConfigError` naming the setting, not an amqtt traceback.
- `_handle_client_session`, `_authenticate`, `_delete_session`: stock amqtt
  deletes the previous session of a clean-session CONNECT's client id, stores
  the new session under that id and closes the connection holding it, all
  before authenticating, and keeps a refused session as "connected" forever.
  Here the CONNECT is authenticated first and a refused client changes
  nothing. Afterwards a handler amqtt left running after ending the message
  loop itself is stopped.
- `_client_message_loop` / `add_subscription`: tell the downlink (`events`)
  when a device's connection is subscribed to its command topic.
- `add_subscription` / `_run_broadcast`: stock amqtt tests every published
  topic against every subscription filter. With thousands of devices each
  subscribed to its own command topic that is linear in the fleet for every
  telemetry message. Here filters are indexed
  by their literal prefix (the levels before the first wildcard; a
  wildcard-free filter is its own prefix, found by a dict lookup of the
  topic), and only the buckets of the topic's prefixes are scanned.
- `_broadcast_message`: applies the publish ACL to a device's will message,
  which stock amqtt publishes without asking the topic plugins.
- `_publish_retained_messages_for_subscription`: stock amqtt sends a
  (re)connecting client the retained messages matching anyone's filters; here
  only those matching the client's own subscriptions, so the ACL holds.
- The subscription table iterates over a snapshot of its keys, because amqtt
  iterates it across awaits while other clients subscribe.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridges.mqtt_auth import (
    DEVICE_ATTRIBUTE,
    DeviceAccess,
    DeviceAuthPlugin,
    DeviceTopicPlugin,
    device_of,
)
from bridges.mqtt_bridge_plugin import (
    BridgingHandler,
    EnvelopeSink,
    FramedReader,
    MqttUplink,
    PacketTooLarge,
    TapConfig,
)
from hub.commands import PendingCommand
from hub.errors import ConfigError, EnvelopeError
from hub.metrics import Metrics
from hub.registry import CredentialCache
from hub.settings import Settings
from hub.topics import command_message, command_topic

log = logging.getLogger(__name__)

_REFUSED = 0x80  # SUBACK return code of a refused subscription
#: Session attribute: this CONNECT was just authenticated (see _authenticate).
_ACCEPTED = "hub.accepted"
_LISTENER = "default"
_BACKLOG = 4096


class ConnectionEvents(Protocol):
    """Told when a device becomes reachable for commands here, or stops being
    (bridges.downlink.Downlink)."""

    def device_connected(self, device_id: str, transport: str) -> None: ...

    def device_disconnected(self, device_id: str) -> None: ...


def _plugin_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _SubscriptionTable(dict[str, list[tuple[Session, int]]]):
    """amqtt's `topic filter -> [(session, qos)]` table. amqtt loops over it with
    `for topic in ...` around awaits (a reconnect publishing retained messages)
    while other clients may subscribe; iterating a snapshot keeps that from
    failing with "dictionary changed size during iteration"."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))


class HubBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker with the hub's overrides; see the module docstring."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        listen_socket: socket.socket,
        tap: TapConfig,
        max_packet_bytes: int,
        connect_timeout_s: float,
        metrics: Metrics,
        topic_root: str,
        access: DeviceAccess,
        events: ConnectionEvents | None = None,
    ) -> None:
        super().__init__(config)
        self._access = access
        self._listen_socket = listen_socket
        self._topic_root = topic_root
        self._events = events
        # Device id -> its connections subscribed to its command topic (a device
        # that reconnects may briefly have two).
        self._reachable: dict[str, int] = {}
        self._tap = tap
        self._max_packet_bytes = max_packet_bytes
        self._connect_timeout_s = connect_timeout_s
        self._metrics = metrics
        self._subscriptions: dict[str, list[tuple[Session, int]]] = _SubscriptionTable()
        # Every subscribed filter, under its literal prefix (the levels before
        # its first wildcard; the whole filter when it has none). Pruned lazily
        # once the table no longer has a filter.
        self._filter_index: dict[str, dict[str, None]] = {}
        # Client id -> clean-session CONNECTs read but not yet authenticated.
        self._deferred_deletions: dict[str, int] = {}

    # -- connections ---------------------------------------------------------------

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            sock=self._listen_socket,
            ssl=ssl_context,
            backlog=_BACKLOG,
        )

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
        framed = FramedReader(
            StreamReaderAdapter(reader), self._max_packet_bytes, peer_text, self._too_large
        )
        timer = asyncio.get_running_loop().call_later(
            self._connect_timeout_s, self._connect_timed_out, framed, writer
        )
        try:
            await self._client_connected(listener_name, framed, StreamWriterAdapter(writer))
        except PacketTooLarge:
            pass  # counted and logged where it was found
        except Exception:
            # The boundary with amqtt: one connection's failure stays with it.
            log.exception("MQTT connection from %s failed", peer_text)
        finally:
            timer.cancel()
            writer.close()

    def _too_large(self, message: str) -> None:
        self._metrics.protocol_errors.labels("mqtt", "packet_too_large").inc()
        log.warning("%s; closing the connection", message)

    def _connect_timed_out(self, framed: FramedReader, writer: asyncio.StreamWriter) -> None:
        if framed.packets == 0:
            self._metrics.protocol_errors.labels("mqtt", "connect_timeout").inc()
            log.warning(
                "MQTT client %s sent no CONNECT within %.1f s (mqtt_connect_timeout_s); closing",
                framed.peer,
                self._connect_timeout_s,
            )
            writer.close()

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        _stock, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        # amqtt hard-codes its handler class when it reads the CONNECT; the
        # stock handler is not attached to anything yet, so it is simply replaced.
        return BridgingHandler(self.plugins_manager, loop=self._loop, tap=self._tap), session

    async def _delete_session(self, client_id: str) -> None:
        # Stock amqtt calls this while reading a clean-session CONNECT, before
        # authenticating it: any client naming a connected device's client id
        # would wipe that device's subscriptions, wrong password or not. The
        # deletion waits for the authentication (`_authenticate` below).
        self._deferred_deletions[client_id] = self._deferred_deletions.get(client_id, 0) + 1

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        if session.attributes.pop(_ACCEPTED, False):
            return True  # amqtt asking again for a CONNECT accepted just before
        authenticated: bool = await super()._authenticate(session, listener)
        client_id = session.client_id
        waiting = self._deferred_deletions.pop(client_id, 0)
        if waiting > 1:
            self._deferred_deletions[client_id] = waiting - 1
        if waiting and authenticated:
            await super()._delete_session(client_id)
        return authenticated

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        # Stock amqtt authenticates here too, but only after it has taken the
        # client id's place in the session table and closed any connection
        # holding it; a refused client must not touch either. So the CONNECT is
        # authenticated first and a refusal answered here.
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            await self._refuse_connect(client_session, handler, reader, writer)
            return
        client_session.attributes[_ACCEPTED] = True
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            await self._session_ended(client_session, handler)

    async def _refuse_connect(
        self,
        session: Session,
        handler: BrokerProtocolHandler,
        reader: ReaderAdapter,
        writer: WriterAdapter,
    ) -> None:
        try:
            # Attached only to write the CONNACK; the session is left as it was.
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
        except Exception:
            log.exception("MQTT: could not answer a refused CONNECT of %s", session.client_id)
        finally:
            await writer.close()

    async def _session_ended(self, session: Session, handler: BrokerProtocolHandler) -> None:
        try:
            if isinstance(handler, BridgingHandler):
                handler.uncount(session)
                self._unannounce(session, handler)
            entry = self._sessions.get(session.client_id)
            if entry is None or entry[1] is not handler:
                return  # already cleaned up, or taken over by a newer connection
            if session.transitions.is_connected():
                # amqtt ended the message loop itself (an invalid topic) without
                # closing the connection: it would stay "connected" for good.
                await self._stop_handler(handler)
                session.transitions.disconnect()
        except Exception:
            log.exception("MQTT session cleanup failed: client_id=%s", session.client_id)

    # -- subscriptions and delivery ----------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        result: int = await super().add_subscription(subscription, session)
        topic_filter = subscription[0]
        if result != _REFUSED:
            bucket = self._filter_index.setdefault(literal_prefix(topic_filter), {})
            bucket[topic_filter] = None
            self._announce_if_subscribed(session)
        return result

    # -- which devices can receive commands here -------------------------------------

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        # A persistent session may come back already subscribed to its commands.
        self._announce_if_subscribed(client_session)
        await super()._client_message_loop(client_session, handler)

    def _announce_if_subscribed(self, session: Session) -> None:
        """Report a device as reachable once its connection is subscribed to its
        command topic: a command published before that would reach nobody."""
        try:
            device_id = device_of(session)
            handler = self._get_handler(session) if device_id is not None else None
            if (
                device_id is None
                or not isinstance(handler, BridgingHandler)
                or handler.announced
                or not handler.started
                or not self.subscribed(session, command_topic(self._topic_root, device_id))
            ):
                return
            handler.announced = True
            self._reachable[device_id] = self._reachable.get(device_id, 0) + 1
            if self._reachable[device_id] == 1 and self._events is not None:
                self._events.device_connected(device_id, "mqtt")
        except Exception:
            log.exception("MQTT: could not report client %s as connected", session.client_id)

    def _unannounce(self, session: Session, handler: BridgingHandler) -> None:
        device_id = device_of(session)
        if not handler.announced or device_id is None:
            return
        handler.announced = False
        left = self._reachable.get(device_id, 1) - 1
        if left > 0:
            self._reachable[device_id] = left
            return
        self._reachable.pop(device_id, None)
        if self._events is not None:
            self._events.device_disconnected(device_id)

    def reachable(self, device_id: str) -> bool:
        """Whether a connection of `device_id` here is subscribed to its commands."""
        return device_id in self._reachable

    def subscribed(self, session: Session, topic: str) -> bool:
        """Whether `session` holds a subscription that matches `topic`."""
        return any(
            s.client_id == session.client_id
            for topic_filter in self.matching_filters(topic)
            for s, _qos in self._subscriptions.get(topic_filter, ())
        )

    def matching_filters(self, topic: str) -> list[str]:
        """The subscribed filters that match `topic`.

        A filter can only match topics that begin with its literal prefix, so
        only the buckets of the topic's own prefixes (one per level, plus the
        empty prefix of filters that start with a wildcard) are looked at:
        the cost follows the topic's depth, not the number of subscriptions.
        """
        levels = topic.split("/")
        prefixes = dict.fromkeys("/".join(levels[:depth]) for depth in range(len(levels) + 1))
        found: list[str] = []
        for prefix in prefixes:
            bucket = self._filter_index.get(prefix)
            if not bucket:
                continue
            for topic_filter in list(bucket):
                if topic_filter not in self._subscriptions:
                    del bucket[topic_filter]
                elif self._matches(topic, topic_filter):
                    found.append(topic_filter)
            if not bucket:
                del self._filter_index[prefix]
        return found

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        # Every message from a client passes here: its publishes (already
        # allowed by the ACL plugin) and its will, which stock amqtt sends
        # without asking the ACL. A device's will that was set by a CONNECT
        # naming its client id must not reach another device's topics either.
        if (
            session is not None
            and topic is not None
            and device_of(session) is not None
            and not self._access.may_publish(session, topic)
        ):
            self._access.refused(session, topic, "publish")
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        for topic_filter in self.matching_filters(broadcast["topic"]):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                await self._deliver(broadcast, target, broadcast.get("qos", sub_qos), running_tasks)

    async def _deliver(
        self, broadcast: dict[str, Any], target: Session, qos: int, running_tasks: Any
    ) -> None:
        """One broadcast to one subscriber, with stock amqtt's rules: the topic
        plugins' `receive` check; an offline persistent (clean session 0),
        non-anonymous session keeps QoS 1/2 messages for its return (MQTT
        3.1.1 section 3.1.2.4); other offline sessions get nothing."""
        topic = broadcast["topic"]
        if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
            return
        if not target.transitions.is_connected():
            if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                await self._retain_broadcast_message(broadcast, qos, target)
            return
        handler = self._get_handler(target)
        if handler is not None:
            running_tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                )
            )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if self._retained_messages and any(s.client_id == session.client_id for s, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    # -- for EmbeddedMqtt ---------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._listen_socket.getsockname()[1])

    def connected_devices(self) -> int:
        return sum(
            1
            for session, _ in list(self._sessions.values())
            if session.transitions.is_connected() and session.attributes.get(DEVICE_ATTRIBUTE)
        )


def literal_prefix(topic_filter: str) -> str:
    """The levels of a filter before its first wildcard, joined again."""
    levels = topic_filter.split("/")
    for depth, level in enumerate(levels):
        if level in ("+", "#"):
            return "/".join(levels[:depth])
    return topic_filter


async def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the broker's listening socket; a busy port is a ConfigError."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for MQTT on host {host!r}: {exc}", key="host", env="HUB_HOST"
        ) from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted hub reuse the port while old connections linger in
        # TIME_WAIT; a port another process listens on still fails below.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"MQTT port {port} on {host} is already in use (another broker such as "
                "Mosquitto?); choose another with mqtt_port / HUB_MQTT_PORT, or bridge from "
                "that broker with mqtt_external_url / HUB_MQTT_EXTERNAL_URL",
                key="mqtt_port",
                env="HUB_MQTT_PORT",
            ) from None
        raise ConfigError(
            f"cannot listen for MQTT on {host}:{port}: {exc.strerror}", key="host", env="HUB_HOST"
        ) from None
    return sock


class EmbeddedMqtt:
    """The MQTT broker embedded in the hub, bridged to the dispatcher."""

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
        self._access = DeviceAccess(settings, credentials, refresh_credentials, metrics)
        self._tap = TapConfig(
            uplink=MqttUplink(dispatcher, metrics, settings.mqtt_topic_root),
            metrics=metrics,
            max_inflight=settings.max_inflight_per_connection,
        )
        self._broker: HubBroker | None = None

    async def start(self) -> None:
        """Bind `host`:`mqtt_port` (0: a free port) and start accepting devices."""
        host, port = self._settings.host, self._settings.mqtt_port
        sock = await bind_listener(host, port)
        bound = sock.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        plugin_config = {"access": self._access}
        config = BrokerConfig(
            listeners={
                _LISTENER: ListenerConfig(type=ListenerType.TCP, bind=f"{shown_host}:{bound}")
            },
            plugins={
                _plugin_path(DeviceAuthPlugin): plugin_config,
                _plugin_path(DeviceTopicPlugin): plugin_config,
            },
        )
        broker = HubBroker(
            config,
            listen_socket=sock,
            tap=self._tap,
            max_packet_bytes=self._settings.mqtt_max_packet_bytes,
            connect_timeout_s=self._settings.mqtt_connect_timeout_s,
            metrics=self._metrics,
            topic_root=self._settings.mqtt_topic_root,
            access=self._access,
            events=self._events,
        )
        try:
            await broker.start()
        except BaseException:
            sock.close()
            raise
        self._broker = broker
        log.info(
            "MQTT broker listening on %s:%d (topics under %s/, anonymous %s)",
            host,
            bound,
            self._settings.mqtt_topic_root,
            "allowed" if self._settings.mqtt_allow_anonymous else "refused",
        )

    @property
    def port(self) -> int:
        """The bound port (the real one when `mqtt_port` was 0)."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not started")
        return self._broker.port

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

    async def stop(self) -> None:
        """Close every connection and the listener. Messages still waiting to be
        durable are not acknowledged; their devices send them again."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
