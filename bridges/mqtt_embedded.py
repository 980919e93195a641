"""The embedded MQTT broker: amqtt running inside the hub's event loop, bridged in process.

Layer: bridges; imports the `hub` core, the other `bridges.mqtt_*` modules and
amqtt. Must not import `tasks`, `firmware_sim`, `hub.cli` or `hub.app`.

`EmbeddedMqtt` is what the hub starts. `HubBroker` is amqtt's `Broker` with
these overrides (amqtt is pinned to 0.12.1 because they touch its internals):

- `_initialize_client_session`: every connection gets a `BridgingHandler`
  (bridges.mqtt_bridge_plugin), which bridges device publishes and sends the
  PUBACK only once the message is durable.
- `stream_connected`: closes a connection beyond `mqtt_max_connections` at
  once (counted), and reads the others through a `PacketReader`
  (bridges.mqtt_packets: whole, checked packets; size limit; CONNECT
  timeout; keep-alive at 1.5x) and always closes the socket at the end
  (stock amqtt leaves it open when the first packet is bad).
- `_create_server_instance`: listens on a socket this module bound itself, so a
  port in use is a `ConfigError` naming the setting, not an amqtt traceback.
- `_initialize_client_session`, `_handle_client_session`, `_take_over`,
  `_continue_session`, `_session_ended`: stock amqtt overwrites a stored
  persistent session with a CONNECT's fields, deletes the previous session of
  a clean-session CONNECT and closes the connection holding its client id,
  all before authenticating; leaves the old connection open on a
  clean-session takeover; and keeps a clean session up to a second after its
  connection (so a quick reconnect got session present). Here the CONNECT is
  authenticated first and a refused client changes nothing; a client id held
  by a connection or a persistent session is bound to the device holding it,
  and another device (or an anonymous client) naming it is refused
  (`client_id_in_use`, CONNACK 5); an accepted one
  closes the connection holding its client id and waits for it to end, then
  resumes the stored session (clean session 0) or discards it
  [MQTT-3.1.2-4], [MQTT-3.1.2-6], [MQTT-3.1.4-2]; a clean session is removed
  when its connection ends.
- `_handle_message_delivery` / `_broadcast_message` / `_run_broadcast`:
  deliver at the lower of the PUBLISH's and the subscription's QoS
  [MQTT-3.8.4-6] (stock amqtt used the subscription's); `_deliver` queues
  QoS 1/2 messages for offline persistent sessions, bounded by
  `mqtt_max_queued_messages`; `_publish_session_retained_messages` sends the
  queue on reconnect without RETAIN and without waiting for acknowledgements.
- `_handle_subscription` / `add_subscription`: retained messages only for the
  filter just subscribed, checked against the ACL, at most at the granted
  QoS [MQTT-3.3.1-6]; a repeated SUBSCRIBE replaces the QoS [MQTT-3.8.4-3].
  `_publish_retained_messages_for_subscription` (stock amqtt's resend, on
  every connect, of the retained messages matching anyone's filter) does
  nothing.
- `_client_message_loop` / `add_subscription`: tell the downlink (`events`)
  when a device's connection is subscribed to its command topic.
- `add_subscription` / `_run_broadcast`: stock amqtt tests every published
  topic against every subscription filter. With thousands of devices each
  subscribed to its own command topic that is linear in the fleet for every
  telemetry message. Here filters are indexed
  by their literal prefix (the levels before the first wildcard; a
  wildcard-free filter is its own prefix, found by a dict lookup of the
  topic) and its depth, and only the topic's prefix at each depth in use is
  looked up: linear in the topic's length, whatever its depth.
- `_broadcast_message`: applies the publish ACL to a device's will message,
  which stock amqtt publishes without asking the topic plugins.
- The subscription table iterates over a snapshot of its keys, because amqtt
  iterates it across awaits while other clients subscribe.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Protocol, cast

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from bridges.mqtt_auth import (
    DEVICE_ATTRIBUTE,
    DeviceAccess,
    DeviceAuthPlugin,
    DeviceTopicPlugin,
    device_of,
)
from bridges.mqtt_bridge_plugin import BridgingHandler, EnvelopeSink, MqttUplink, TapConfig
from bridges.mqtt_packets import PacketReader, ProtocolViolation
from hub.commands import PendingCommand
from hub.errors import ConfigError, EnvelopeError
from hub.metrics import Metrics
from hub.registry import CredentialCache
from hub.settings import Settings
from hub.topics import PayloadLimits, command_message, command_topic

log = logging.getLogger(__name__)

_REFUSED = 0x80  # SUBACK return code of a refused subscription
#: Session attribute: this CONNECT was just authenticated (see _authenticate).
_ACCEPTED = "hub.accepted"
#: Session attribute: its offline queue overflowed (logged once per absence).
_QUEUE_FULL = "hub.queue_full"
#: Session attribute: connected and its offline queue sent, so new messages go
#: straight to the connection (until then they join the queue, keeping order).
_LIVE = "hub.live"
#: At most one log line per this many seconds about connections refused at the limit.
_LIMIT_LOG_INTERVAL_S = 10.0
#: `_holder_of`: nobody holds the client id.
_FREE = object()
_LISTENER = "default"
_BACKLOG = 4096
#: How long a CONNECT taking over a client id waits for the old connection to end.
_TAKEOVER_WAIT_S = 5.0
#: Session fields a resumed persistent session takes from the new CONNECT.
_CONNECT_FIELDS = (
    "will_flag",
    "will_message",
    "will_topic",
    "will_qos",
    "will_retain",
    "keep_alive",
    "username",
    "password",
    "remote_address",
    "remote_port",
    "ssl_object",
    "is_anonymous",
)
#: The QoS of the PUBLISH being broadcast, set around amqtt's handling of it
#: (each connection's message loop is a task of its own, so each has its own).
_PUBLISH_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "hub_mqtt_publish_qos", default=None
)


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

    def __repr__(self) -> str:
        # amqtt logs repr(subscriptions) after every SUBSCRIBE (at DEBUG, but the
        # argument is built anyway): the full repr made connects O(n^2).
        return f"<subscriptions: {len(self)} filters>"


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
        max_topic_levels: int,
        max_connections: int,
        max_queued_messages: int,
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
        self._max_topic_levels = max_topic_levels
        self._max_connections = max_connections
        self._open_connections = 0
        self._limit_refusals = metrics.connections_refused.labels("mqtt", "connection_limit")
        self._limit_logged_at = -_LIMIT_LOG_INTERVAL_S
        self._limit_unlogged = 0
        self._max_queued = max_queued_messages
        self._metrics = metrics
        self._subscriptions: dict[str, list[tuple[Session, int]]] = _SubscriptionTable()
        # Every subscribed filter, by the number of levels of its literal
        # prefix (the levels before its first wildcard; the whole filter when
        # it has none), then by that prefix. Pruned lazily once the table no
        # longer has a filter.
        self._filter_index: dict[int, dict[str, dict[str, None]]] = {}
        # Client ids whose CONNECT was accepted and is taking them over: the
        # device (None: anonymous) that will hold each (see _holder_of).
        self._claims: dict[str, str | None] = {}

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
        if now - self._limit_logged_at >= _LIMIT_LOG_INTERVAL_S:
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
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
        packets = PacketReader(
            reader,
            max_packet_bytes=self._max_packet_bytes,
            connect_timeout_s=self._connect_timeout_s,
            max_topic_levels=self._max_topic_levels,
            peer=peer_text,
            reply=writer.write,
            on_violation=self._violation,
        )
        try:
            await self._client_connected(listener_name, packets, StreamWriterAdapter(writer))
        except Exception:
            # The boundary with amqtt: one connection's failure stays with it.
            self._metrics.protocol_errors.labels("mqtt", "internal_error").inc()
            log.exception("MQTT connection from %s failed", peer_text)
        finally:
            # Stock amqtt leaves the socket open when the first packet is not a
            # CONNECT or the CONNECT is refused early; every connection ends here.
            writer.close()

    def _violation(self, violation: ProtocolViolation, peer: str) -> None:
        self._metrics.protocol_errors.labels("mqtt", violation.reason).inc()
        log.warning("MQTT client %s: %s; closing the connection", peer, violation)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # Stock amqtt looks up, and overwrites, a persistent session here, before
        # the CONNECT is authenticated, and deletes the previous session of a
        # clean one. Here the CONNECT only becomes a new `Session`; which
        # session the connection continues is decided once it is accepted
        # (`_continue_session`). The stock handler is replaced by ours.
        _stock, session = await BrokerProtocolHandler.init_from_connect(
            reader, writer, self.plugins_manager
        )
        if not session.client_id:
            session.client_id = gen_client_id()  # [MQTT-3.1.3-6]
        session.parent = 0
        # The `PacketReader` enforces the keep-alive (1.5x, [MQTT-3.1.2-24]).
        # amqtt's own read timeout would only cancel reads every keep-alive
        # period, and its write timer is rescheduled on every packet sent for a
        # callback that does nothing in a broker: both are turned off.
        session.keep_alive = 0
        return BridgingHandler(self.plugins_manager, loop=self._loop, tap=self._tap), session

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        if session.attributes.pop(_ACCEPTED, False):
            # amqtt asking again for a CONNECT accepted just before; it puts
            # the session in its table next, without an await in between.
            self._claims.pop(session.client_id, None)
            return True
        authenticated: bool = await super()._authenticate(session, listener)
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
        client_id = client_session.client_id
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            await self._refuse_connect(client_session, handler, reader, writer)
            return
        # A client id in use belongs to the device holding it: only that device
        # may take it over (docs/mqtt.md, "Authentication"). Checked after the
        # last await of authentication, and the claim covers the awaits until
        # the new session is in the table, so no other device slips in between.
        holder = self._holder_of(client_id)
        if holder is not _FREE and not self._access.may_take_client_id(
            client_session, cast("str | None", holder)
        ):
            await self._refuse_connect(client_session, handler, reader, writer)
            return
        self._claims[client_id] = device_of(client_session)
        try:
            await self._take_over(client_id)
            session = await self._continue_session(client_session)
        except BaseException:
            self._claims.pop(client_id, None)
            raise
        session.attributes[_ACCEPTED] = True
        try:
            await super()._handle_client_session(
                reader, writer, session, handler, server, listener_name
            )
        finally:
            if session.attributes.pop(_ACCEPTED, False):
                self._claims.pop(client_id, None)  # ended before amqtt took it
            await self._session_ended(session, handler)
            if isinstance(handler, BridgingHandler):
                handler.finished.set()

    def _holder_of(self, client_id: str) -> object:
        """The device (None: an anonymous client) a client id is bound to, or
        `_FREE`: bound while a connection or a persistent session holds it, or
        an accepted CONNECT is on its way to taking it."""
        if client_id in self._claims:
            return self._claims[client_id]
        entry = self._sessions.get(client_id)
        if entry is None:
            return _FREE
        session = entry[0]
        if session.transitions.is_connected() or not session.clean_session:
            return device_of(session)
        return _FREE

    async def _take_over(self, client_id: str) -> None:
        """Close the connection holding `client_id`, if any, and wait until it
        has ended (its will published) [MQTT-3.1.4-2]. Stock amqtt closes it
        only for persistent sessions, and then concurrently with the new
        connection using the same session."""
        entry = self._sessions.get(client_id)
        if entry is None or not entry[0].transitions.is_connected():
            return
        old_session, old_handler = entry
        log.info("MQTT client id %s connected again; closing its previous connection", client_id)
        await self._stop_handler(old_handler)
        if isinstance(old_handler, BridgingHandler):
            try:
                await asyncio.wait_for(old_handler.finished.wait(), _TAKEOVER_WAIT_S)
            except TimeoutError:
                log.warning("MQTT: the previous connection of %s did not end in time", client_id)
        if old_session.transitions.is_connected():
            old_session.transitions.disconnect()

    async def _continue_session(self, incoming: Session) -> Session:
        """The session an accepted CONNECT continues: the stored one when the
        client asks to resume (clean session 0) and one exists, with session
        present set [MQTT-3.2.2-2]; otherwise `incoming`, a new session, with
        any previous state discarded [MQTT-3.1.2-6], [MQTT-3.2.2-1]."""
        client_id = incoming.client_id
        entry = self._sessions.get(client_id)
        stored = entry[0] if entry is not None else None
        if stored is not None and (incoming.clean_session or stored.clean_session):
            await self._discard_session(client_id)
            stored = None
        if stored is None:
            incoming.parent = 0
            return incoming
        stored.attributes.pop(_LIVE, None)
        for name in _CONNECT_FIELDS:
            setattr(stored, name, getattr(incoming, name))
        stored.attributes.update(incoming.attributes)
        stored.parent = 1
        return stored

    async def _discard_session(self, client_id: str) -> None:
        entry = self._sessions.pop(client_id, None)
        if entry is None:
            return
        session = entry[0]
        await self._del_all_subscriptions(session)
        session.clear_queues()
        session.inflight_in.clear()
        session.inflight_out.clear()

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
            session.attributes.pop(_LIVE, None)
            if session.transitions.is_connected():
                # amqtt ended the message loop itself (an invalid topic) without
                # closing the connection: it would stay "connected" for good.
                await self._stop_handler(handler)
                session.transitions.disconnect()
            if session.clean_session:
                # A clean session ends with its connection [MQTT-3.1.2-6]; stock
                # amqtt keeps it up to a second, and a client reconnecting within
                # it got session present set.
                await self._discard_session(session.client_id)
        except Exception:
            self._metrics.protocol_errors.labels("mqtt", "internal_error").inc()
            log.exception("MQTT session cleanup failed: client_id=%s", session.client_id)

    # -- subscriptions and delivery ----------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        result: int = await super().add_subscription(subscription, session)
        topic_filter = subscription[0]
        if result != _REFUSED:
            # A new subscription to a filter the client already has replaces it,
            # QoS included [MQTT-3.8.4-3]; stock amqtt kept the old QoS.
            holders = self._subscriptions.get(topic_filter, [])
            for index, (holder, _qos) in enumerate(holders):
                if holder.client_id == session.client_id:
                    holders[index] = (session, result)
            depth, prefix = literal_prefix(topic_filter)
            bucket = self._filter_index.setdefault(depth, {}).setdefault(prefix, {})
            bucket[topic_filter] = None
            self._announce_if_subscribed(session)
        return result

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: Any
    ) -> None:
        """SUBSCRIBE: grant or refuse each filter, SUBACK, then the retained
        messages of each granted filter [MQTT-3.3.1-6], at most at the granted
        QoS and only where the ACL lets this client receive the topic."""
        subscriptions = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        for (topic_filter, _requested), granted in zip(subscriptions.topics, codes, strict=True):
            if granted == _REFUSED:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=granted,
            )
            await self._send_retained(client_session, handler, topic_filter, granted)

    async def _send_retained(
        self, session: Session, handler: BrokerProtocolHandler, topic_filter: str, granted: int
    ) -> None:
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            qos = min(granted, retained.qos or QOS_0)
            # Not awaited: waiting for the client's acknowledgements here would
            # stall its own message loop. Tasks start in order, so they are
            # written in order.
            self._tasks_queue.append(
                asyncio.ensure_future(handler.mqtt_publish(topic, retained.data, qos, retain=True))
            )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Stock amqtt calls this for every filter anyone subscribed to each time
        # a client connects, so a client got the retained messages of other
        # clients' filters. Retained messages are sent when a subscription is
        # made [MQTT-3.3.1-6], by `_handle_subscription`; never on connect.
        return

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Send what was queued for a persistent session while it was offline
        [MQTT-3.1.2-5], in order, after the resent in-flight messages. Stock
        amqtt sets RETAIN on them (wrong [MQTT-3.3.1-9]) and waits for every
        acknowledgement before reading the client's packets."""
        handler = self._get_handler(session)
        session.attributes.pop(_QUEUE_FULL, None)
        while handler is not None and not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            self._tasks_queue.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        # No await since the queue was found empty: nothing can slip in between.
        session.attributes[_LIVE] = True

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: Any
    ) -> None:
        # Stock amqtt leaves its message loop at once when the connection ends,
        # dropping messages the client sent just before (QoS 1 ones already
        # acknowledged). What was read is passed on first.
        # amqtt's loop may hold one already, ahead of those still queued.
        queue = client_session.delivered_message_queue
        taken = handler.taken if isinstance(handler, BridgingHandler) else None
        waiting = [taken] if taken is not None else []
        while not queue.empty():
            waiting.append(queue.get_nowait())
        for message in waiting:
            read: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            read.set_result(message)
            if not await self._handle_message_delivery(client_session, handler, read):
                break
        if isinstance(handler, BridgingHandler) and taken is not None:
            handler.passed_on = taken  # amqtt's loop handles it next: skipped
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: Any
    ) -> bool:
        # Remember the PUBLISH's QoS for `_broadcast_message`: stock amqtt drops
        # it and delivers at each subscription's QoS.
        message = wait_deliver.result()
        if isinstance(handler, BridgingHandler) and message is not None:
            if message is handler.passed_on:
                handler.passed_on = None
                return True  # passed on already, when the connection ended
            if message is handler.taken:
                handler.taken = None
        token = _PUBLISH_QOS.set(message.qos if message is not None else None)
        try:
            delivered: bool = await super()._handle_message_delivery(
                client_session, handler, wait_deliver
            )
            return delivered
        finally:
            _PUBLISH_QOS.reset(token)

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
        only one bucket per prefix depth that some filter has is looked at:
        the topic's own prefix of that many levels. The cost follows the
        topic's length times the number of distinct depths (bounded by
        `mqtt_max_topic_levels`), not the number of subscriptions, and never
        the square of the topic's depth (every prefix of a 32,767-level topic
        built one by one took seconds).
        """
        found: list[str] = []
        if not self._filter_index:
            return found
        # Where each of the topic's first levels ends, up to the deepest prefix.
        ends: list[int] = []
        at = -1
        for _ in range(max(self._filter_index)):
            at = topic.find("/", at + 1)
            if at < 0:
                ends.append(len(topic))  # the last level
                break
            ends.append(at)
        for depth in list(self._filter_index):
            if depth > len(ends):
                continue  # the topic has fewer levels than this prefix
            by_prefix = self._filter_index[depth]
            prefix = topic[: ends[depth - 1]] if depth else ""
            bucket = by_prefix.get(prefix)
            if bucket is None:
                continue
            for topic_filter in list(bucket):
                if topic_filter not in self._subscriptions:
                    del bucket[topic_filter]
                elif self._matches(topic, topic_filter):
                    found.append(topic_filter)
            if not bucket:
                del by_prefix[prefix]
                if not by_prefix:
                    del self._filter_index[depth]
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
        if topic is not None and not self.matching_filters(topic):
            # Nobody subscribes (the usual case for device telemetry, which the
            # bridge has already taken): stock amqtt would still queue it for
            # the broadcast loop, and under sustained load that unbounded queue
            # grew by hundreds of MB. Retained messages were kept before this.
            return
        if force_qos is None:
            force_qos = _PUBLISH_QOS.get()
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        published_qos = broadcast.get("qos")
        for topic_filter in self.matching_filters(broadcast["topic"]):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                # The lower of the PUBLISH's QoS and the subscription's
                # [MQTT-3.8.4-6]; stock amqtt used the subscription's.
                qos = sub_qos if published_qos is None else min(published_qos, sub_qos)
                await self._deliver(broadcast, target, qos, running_tasks)

    async def _deliver(
        self, broadcast: dict[str, Any], target: Session, qos: int, running_tasks: Any
    ) -> None:
        """One broadcast to one subscriber: the topic plugins' `receive` check;
        an offline persistent session (clean session 0) keeps its QoS 1 and 2
        messages for its return [MQTT-3.1.2-5], up to `mqtt_max_queued_messages`;
        other offline sessions get nothing."""
        topic = broadcast["topic"]
        if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
            return
        if not target.transitions.is_connected():
            if not target.clean_session and qos > QOS_0:
                self._queue_for(target, broadcast, qos)
            return
        if not target.attributes.get(_LIVE):
            # Connected, but what was queued for it is not sent yet: behind it,
            # so the order of messages holds across the reconnect [MQTT-4.6.0-6].
            self._queue_for(target, broadcast, qos)
            return
        handler = self._get_handler(target)
        if handler is not None:
            running_tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                )
            )

    def _queue_for(self, target: Session, broadcast: dict[str, Any], qos: int) -> None:
        if target.retained_messages.qsize() >= self._max_queued:
            if not target.attributes.get(_QUEUE_FULL):
                target.attributes[_QUEUE_FULL] = True
                log.warning(
                    "MQTT client %s is offline with %d messages queued "
                    "(mqtt_max_queued_messages); dropping newer ones until it returns",
                    target.client_id,
                    self._max_queued,
                )
            return
        source, topic, data = broadcast["session"], broadcast["topic"], broadcast["data"]
        target.retained_messages.put_nowait(RetainedApplicationMessage(source, topic, data, qos))

    # -- for EmbeddedMqtt ---------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._listen_socket.getsockname()[1])

    async def disconnect_device(self, device_id: str) -> int:
        """Close every connection authenticated as the device; how many there were."""
        closed = 0
        for session, handler in list(self._sessions.values()):
            if (
                session.attributes.get(DEVICE_ATTRIBUTE) == device_id
                and session.transitions.is_connected()
            ):
                await self._stop_handler(handler)
                closed += 1
        return closed

    def connected_devices(self) -> int:
        return sum(
            1
            for session, _ in list(self._sessions.values())
            if session.transitions.is_connected() and session.attributes.get(DEVICE_ATTRIBUTE)
        )


def literal_prefix(topic_filter: str) -> tuple[int, str]:
    """The levels of a filter before its first wildcard: how many, and joined again."""
    levels = topic_filter.split("/")
    for depth, level in enumerate(levels):
        if level in ("+", "#"):
            return depth, "/".join(levels[:depth])
    return len(levels), topic_filter


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
        self._access = DeviceAccess(settings, credentials, refresh_credentials, metrics)
        self._tap = TapConfig(
            uplink=MqttUplink(
                dispatcher,
                metrics,
                settings.mqtt_topic_root,
                PayloadLimits(settings.max_payload_depth, settings.max_payload_bytes),
            ),
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
            max_topic_levels=self._settings.mqtt_max_topic_levels,
            max_connections=self._settings.mqtt_max_connections,
            max_queued_messages=self._settings.mqtt_max_queued_messages,
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

    async def disconnect_device(self, device_id: str) -> int:
        """Drop the device's connections (it was re-keyed or removed)."""
        return await self._broker.disconnect_device(device_id) if self._broker is not None else 0

    async def stop(self) -> None:
        """Close every connection and the listener. Messages still waiting to be
        durable are not acknowledged; their devices send them again."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
