"""Session takeover: which session an accepted CONNECT continues, and who may take a client id.

Layer: bridges; imports the `hub` core, the other `bridges.mqtt` modules and
amqtt.

`SessionBroker` is amqtt 0.12.1's `Broker` with these overrides
(docs/mqtt.md, "What we override in amqtt"):
`_initialize_client_session`, `_handle_client_session` (with
`_run_session`, which replaces the rest of stock amqtt's), `_session_ended`.
Stock amqtt overwrites a stored persistent session with a CONNECT's fields,
deletes the previous session of a clean-session CONNECT and closes the
connection holding its client id, all before authenticating; leaves the
old connection open on a clean-session takeover; and keeps a clean session
up to a second after its connection (so a quick reconnect got session
present). Here the CONNECT is authenticated first and a refused
client changes nothing; a client id held by a connection or a persistent
session is bound to the device holding it, and another device (or an
anonymous client) naming it is refused (`client_id_in_use`, CONNACK 5); an
accepted one closes the connection holding its client id and waits for it to
end (`_take_over`), then resumes the stored session (clean session 0) or
discards it (`_continue_session`) [MQTT-3.1.2-4], [MQTT-3.1.2-6],
[MQTT-3.1.4-2]; a clean session is removed when its connection ends. Every
connection gets a `BridgingHandler` (bridges.mqtt.tap), which bridges device
publishes and sends the PUBACK only once the message is durable. The
CONNACK is written before the session's other work (its event, its offline
queue, its message loop) and gives the connection's place among the
handshakes in progress to the next (bridges.mqtt.handshakes); and nothing on
connect looks at every session or every subscription.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.events import BrokerEvents
from amqtt.mqtt.protocol import broker_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id
from transitions import MachineError

from bridges.mqtt.auth import DeviceAccess
from bridges.mqtt.handshakes import leave
from bridges.mqtt.state import LeanSession, identity_of, state_of
from bridges.mqtt.tap import AclBridgingHandler, BridgingHandler, TapConfig
from hub.metrics import Metrics

log = logging.getLogger(__name__)

# amqtt's broker handler makes the `Session` of each CONNECT by this module
# name (`BrokerProtocolHandler.init_from_connect`): a `LeanSession` costs a
# connection a fraction of the memory and CPU (bridges.mqtt.state).
setattr(broker_handler, "Session", LeanSession)  # noqa: B010  (an untyped module's global)

#: `_holder_of`: nobody holds the client id.
_FREE = object()
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


class SessionBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker with the hub's session takeover; see the module docstring.
    `bridges.mqtt.broker.HubBroker` sets the attributes below."""

    _access: DeviceAccess
    _metrics: Metrics
    _tap: TapConfig
    #: Client ids whose CONNECT was accepted and is taking them over: the
    #: device (None: anonymous) that will hold each (see _holder_of).
    _claims: dict[str, str | None]

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
        handler = BridgingHandler if self._tap.acl is None else AclBridgingHandler
        return handler(self.plugins_manager, loop=self._loop, tap=self._tap), session

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
        self._claims[client_id] = identity_of(client_session)
        try:
            await self._take_over(client_id)
            session = await self._continue_session(client_session)
        except BaseException:
            self._claims.pop(client_id, None)
            raise
        try:
            await self._run_session(reader, writer, session, handler)
        finally:
            self._claims.pop(client_id, None)  # if it ended before taking its place
            await self._session_ended(session, handler)
            if isinstance(handler, BridgingHandler):
                handler.finished.set()

    async def _run_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        session: Session,
        handler: BrokerProtocolHandler,
    ) -> None:
        """An accepted CONNECT's session, from its place in the session table
        to the end of its message loop: what stock amqtt's
        `_handle_client_session` does after authenticating, without its loop
        over every subscription filter of every client on each connect (to
        publish retained messages: `_publish_retained_messages_for_subscription`
        does nothing here, see bridges.mqtt.delivery). That loop made each
        connect cost the number of subscriptions, and a connection storm the
        square of the fleet."""
        client_id = session.client_id
        while True:
            try:
                session.transitions.connect()
                break
            except (MachineError, ValueError):
                if session.transitions.is_connected():
                    break  # `_take_over` waited for the old connection; its state is stale
                await asyncio.sleep(1)  # as stock amqtt: a session still disconnecting
        handler.attach(session, reader, writer)
        # Its place is taken without an await since the claim was checked.
        self._sessions[client_id] = (session, handler)
        self._claims.pop(client_id, None)
        try:
            await handler.mqtt_connack_authorize(True)
        finally:
            leave()  # the handshake is over: the next connection may read its CONNECT
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
        )
        await handler.start()
        await self._publish_session_retained_messages(session)
        await self._client_message_loop(session, handler)

    def _holder_of(self, client_id: str) -> object:
        """Who (`identity_of`: a device, a service user, None for an anonymous
        client) a client id is bound to, or
        `_FREE`: bound while a connection or a persistent session holds it, or
        an accepted CONNECT is on its way to taking it."""
        if client_id in self._claims:
            return self._claims[client_id]
        entry = self._sessions.get(client_id)
        if entry is None:
            return _FREE
        session = entry[0]
        if session.transitions.is_connected() or not session.clean_session:
            return identity_of(session)
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
        for name in _CONNECT_FIELDS:
            setattr(stored, name, getattr(incoming, name))
        # The new CONNECT's identity; the stored session's offline-queue flag.
        state = state_of(incoming)
        state.queue_full, state.live = state_of(stored).queue_full, False
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
            leave()
            await writer.close()

    async def _session_ended(self, session: Session, handler: BrokerProtocolHandler) -> None:
        try:
            if isinstance(handler, BridgingHandler):
                handler.uncount(session)
                self._unannounce(session, handler)
            entry = self._sessions.get(session.client_id)
            if entry is None or entry[1] is not handler:
                return  # already cleaned up, or taken over by a newer connection
            state_of(session).live = False
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
