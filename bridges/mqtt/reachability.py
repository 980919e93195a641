"""Which devices can receive commands through the embedded broker.

Layer: bridges; imports the `hub` core, `bridges.transport`, the other
`bridges.mqtt` modules and amqtt.

A command published to a device before its connection is subscribed to its
command topic would reach nobody, so a device counts as reachable here (and
the downlink, `ConnectionEvents`, is told) only once a connection of it that
amqtt has started holds a subscription matching its command topic; it stops
being reachable when its last such connection ends. `ReachableBroker` is
amqtt's `Broker` with the two overrides that see that moment:
`_client_message_loop` (a persistent session may come back already
subscribed) and `add_subscription`.
"""

from __future__ import annotations

import logging

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from bridges.mqtt.state import device_of
from bridges.mqtt.tap import BridgingHandler
from bridges.transport import ConnectionEvents
from hub.topics import command_topic

log = logging.getLogger(__name__)

#: SUBACK return code of a refused subscription.
_REFUSED = 0x80


class ReachableBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker, telling the downlink which devices it can reach.
    `bridges.mqtt.broker.HubBroker` sets the attributes below."""

    _topic_root: str
    _events: ConnectionEvents | None
    #: Device id -> its connections subscribed to its command topic (a device
    #: that reconnects may briefly have two).
    _reachable: dict[str, int]

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        # A persistent session may come back already subscribed to its commands.
        self._announce_if_subscribed(client_session)
        await super()._client_message_loop(client_session, handler)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        result: int = await super().add_subscription(subscription, session)
        if result != _REFUSED:
            self._announce_if_subscribed(session)
        return result

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
