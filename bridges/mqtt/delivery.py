"""How the embedded broker delivers: subscriptions, retained messages, offline queues, QoS.

Layer: bridges; imports the `hub` core, the other `bridges.mqtt` modules and
amqtt.

`DeliveringBroker` is amqtt 0.12.1's `Broker` with these overrides
(docs/mqtt.md, "What we override in amqtt"):

- `add_subscription`: indexes the filter (bridges.mqtt.subscriptions); a
  repeated SUBSCRIBE replaces the QoS [MQTT-3.8.4-3]. With
  `_del_subscription`, it also forgets the `has_subscribers` answers, which
  the fast path of device uplink asks per message (bridges.mqtt.tap), and
  keeps the filters of each client id, so that `_del_all_subscriptions`
  (a session ending) looks only at the session's own filters, not at
  everyone's; a filter nobody holds any more leaves the table.
- `_handle_subscription` / `_send_retained`: retained messages only for the
  filter just subscribed, checked against the ACL, at most at the granted
  QoS [MQTT-3.3.1-6]. `_publish_retained_messages_for_subscription` (stock
  amqtt's resend, on every connect, of the retained messages matching
  anyone's filter) does nothing.
- `_handle_message_delivery` / `_broadcast_message` / `_run_broadcast`:
  deliver at the lower of the PUBLISH's and the subscription's QoS
  [MQTT-3.8.4-6] (stock amqtt used the subscription's), to the filters the
  index finds, and nothing at all is queued when no filter matches.
- `_deliver` / `_queue_for`: QoS 1 and 2 messages for an offline persistent
  session are queued, bounded by `mqtt_max_queued_messages`;
  `_publish_session_retained_messages` sends that queue on reconnect without
  RETAIN and without waiting for acknowledgements.
- `_handle_disconnect`: messages read just before the connection ended are
  passed on first (stock amqtt dropped them), and a device's will (any
  client's, with an ACL file) is checked against the ACL before amqtt
  publishes it (stock amqtt asks no topic plugin about wills).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridges.mqtt.auth import DeviceAccess
from bridges.mqtt.state import device_of, state_of
from bridges.mqtt.subscriptions import SubscriptionIndex, topic_matches
from bridges.mqtt.tap import BridgingHandler

log = logging.getLogger(__name__)

#: Topics whose `has_subscribers` answer is kept (bounded: topics are the
#: devices' own, a few each).
_SUBSCRIBED_TOPICS_KEPT = 65536

#: SUBACK return code of a refused subscription.
REFUSED = 0x80
#: The QoS of the PUBLISH being broadcast, set around amqtt's handling of it
#: (each connection's message loop is a task of its own, so each has its own).
_PUBLISH_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "hub_mqtt_publish_qos", default=None
)


class DeliveringBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker with the hub's delivery rules; see the module docstring.
    `bridges.mqtt.broker.HubBroker` sets the attributes below."""

    _access: DeviceAccess
    _index: SubscriptionIndex
    _max_queued: int
    #: `has_subscribers` by topic, forgotten at every (un)subscription.
    _subscribed_topics: dict[str, bool]
    #: The filters each client id holds in `_subscriptions`.
    _filters_of: dict[str, set[str]]

    # -- subscriptions -----------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        result: int = await super().add_subscription(subscription, session)
        topic_filter = subscription[0]
        if result != REFUSED:
            # A new subscription to a filter the client already has replaces it,
            # QoS included [MQTT-3.8.4-3]; stock amqtt kept the old QoS.
            holders = self._subscriptions.get(topic_filter, [])
            for index, (holder, _qos) in enumerate(holders):
                if holder.client_id == session.client_id:
                    holders[index] = (session, result)
            self._index.add(topic_filter)
            self._filters_of.setdefault(session.client_id, set()).add(topic_filter)
            self._subscribed_topics.clear()
        return result

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        if deleted:
            self._subscribed_topics.clear()
            filters = self._filters_of.get(session.client_id)
            if filters is not None:
                filters.discard(a_filter)
                if not filters:
                    del self._filters_of[session.client_id]
            if not self._subscriptions.get(a_filter, True):
                # Nobody holds it any more (stock amqtt kept the empty entry
                # after an UNSUBSCRIBE, one per filter ever used).
                del self._subscriptions[a_filter]
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # Stock amqtt tries every filter of every client (a session ending cost
        # the number of subscriptions, a storm of disconnects the square of
        # the fleet); only the session's own are looked at here.
        for topic_filter in self._filters_of.pop(session.client_id, ()):
            self._del_subscription(topic_filter, session)

    def has_subscribers(self, topic: str) -> bool:
        """Whether some session (online or a stored persistent one) holds a
        subscription matching `topic`: then a device's publish there takes
        amqtt's path, which delivers it (bridges.mqtt.tap, the fast path)."""
        known = self._subscribed_topics
        found = known.get(topic)
        if found is None:
            # Remembered until the next subscription or unsubscription: a busy
            # device topic is looked up in the index once, not per message.
            table = self._subscriptions
            found = any(table.get(f) for f in self._index.matching(topic, table))
            if len(known) >= _SUBSCRIBED_TOPICS_KEPT:
                known.clear()
            known[topic] = found
        return found

    def matching_filters(self, topic: str) -> list[str]:
        """The subscribed filters that match `topic` (bridges.mqtt.subscriptions)."""
        return self._index.matching(topic, self._subscriptions)

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
            if granted == REFUSED:
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
            if not topic_matches(topic, topic_filter):
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

    # -- a client's messages in ------------------------------------------------------------

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
        self._check_will(client_session, disconnect_waiter.result())
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    def _check_will(self, session: Session, ended_by: object) -> None:
        """Drop a device's will that its ACL refuses, before amqtt publishes it
        (on any end but a DISCONNECT packet): stock amqtt publishes a will
        without asking the topic plugins. The will topic was checked when its
        CONNECT was authenticated; this keeps a forged command impossible
        whatever set the session's will."""
        if isinstance(ended_by, DisconnectPacket) or not session.will_flag:
            return
        topic = session.will_topic or ""
        checked = device_of(session) is not None or self._access.has_acl_file
        if checked and not self._access.may_publish(session, topic):
            self._access.refused(session, topic, "publish")
            session.will_flag = False
            session.will_retain = False

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: Any
    ) -> bool:
        # amqtt asks the ACL here, once per PUBLISH (bridges.mqtt.auth). The
        # PUBLISH's QoS is remembered for `_broadcast_message`: stock amqtt
        # drops it and delivers at each subscription's QoS.
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

    # -- messages out to subscribers ---------------------------------------------------------

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
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
        if not state_of(target).live:
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
            state = state_of(target)
            if not state.queue_full:
                state.queue_full = True
                log.warning(
                    "MQTT client %s is offline with %d messages queued "
                    "(mqtt_max_queued_messages); dropping newer ones until it returns",
                    target.client_id,
                    self._max_queued,
                )
            return
        source, topic, data = broadcast["session"], broadcast["topic"], broadcast["data"]
        target.retained_messages.put_nowait(RetainedApplicationMessage(source, topic, data, qos))

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Send what was queued for a persistent session while it was offline
        [MQTT-3.1.2-5], in order, after the resent in-flight messages. Stock
        amqtt sets RETAIN on them (wrong [MQTT-3.3.1-9]) and waits for every
        acknowledgement before reading the client's packets."""
        handler = self._get_handler(session)
        state = state_of(session)
        state.queue_full = False
        while handler is not None and not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            self._tasks_queue.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        # No await since the queue was found empty: nothing can slip in between.
        state.live = True
