"""The publish tap: device publishes in, envelopes to the dispatcher, PUBACK once durable.

Layer: bridges; imports the `hub` core, `bridges.transport`, the other
`bridges.mqtt` modules and amqtt.

The rule of docs/delivery.md, in one place for both MQTT modes: a device's
message is acknowledged only once it is durable. `MqttUplink.submit` turns a
publish on an uplink topic into an envelope and submits it, returning the
dispatcher's future, or None when there is nothing to bridge (not an uplink
topic, not the sender's own, an invalid payload: counted, and acknowledged
at once, since sending it again would fail the same way). `may_acknowledge`
judges a future that is done: acknowledge only when it succeeded. The
embedded broker waits for it (`wait_durable`); the external-broker bridge
(bridges.mqtt.external) judges it in a done callback.

`BridgingHandler` is amqtt's broker-side protocol handler (with the QoS
fixes of bridges.mqtt.qos) and the tap built in. Stock amqtt 0.12.1 sends
the PUBACK of an incoming QoS 1 PUBLISH right after queueing the message for
the broker (`ProtocolHandler._handle_qos1_message_flow`), before any plugin
hook has run, so no plugin can hold the PUBACK back. `handle_publish` is the
one method that receives each PUBLISH, in a task of its own per packet; this
subclass submits the envelope there, waits for the dispatcher's future, and
only then hands the packet to the stock flow, which queues it for the broker
and sends the PUBACK (QoS 1) or PUBREC (QoS 2). Waiting happens in that
per-packet task, so one slow message holds back neither the reader of its
connection nor any other client. It pauses the connection's reader while too
many of its messages wait to become durable (backpressure,
`max_inflight_per_connection`), and answers refused CONNECTs with the
fitting return code.

The fast path (docs/mqtt.md, "The fast path"): once a device's session runs,
the packet reader offers each checked PUBLISH to `_fast_publish` first. A
QoS 0 or 1 PUBLISH, not retained, on the device's own uplink topic, that the
ACL allows and nobody subscribes to, is bridged there and never reaches
amqtt; its PUBACK is the connection's `AckSequencer`'s (bridges.mqtt.acks),
in which every QoS 1 PUBLISH of the connection, fast or not, takes its place
as it is read, so PUBACKs leave in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import ApplicationMessage, Session

from bridges.backpressure import Room
from bridges.mqtt.acks import AckSequencer
from bridges.mqtt.auth import BAD_CREDENTIAL, UNKNOWN_DEVICE, DeviceAccess
from bridges.mqtt.lean import LeanEvent, LeanQueue
from bridges.mqtt.qos import QosFlowHandler
from bridges.mqtt.reader import PacketReader
from bridges.mqtt.state import device_of, state_of
from bridges.mqtt.websocket import WebSocketWriter
from bridges.transport import EnvelopeSink
from hub.errors import DispatchError, EnvelopeError, HubError
from hub.metrics import Metrics
from hub.topics import DEFAULT_LIMITS, DeviceTopic, PayloadLimits, parse_topic
from hub.uplink import envelope_from_payload, presence_envelope

log = logging.getLogger(__name__)

#: Parsed topics kept per connection for the fast path (devices use a few).
_OWN_TOPICS_KEPT = 16


def _consume(future: asyncio.Future[None]) -> None:
    # Nobody waits for a QoS 0 or presence future; retrieve its outcome so that
    # a shutdown failure is not reported as "exception never retrieved".
    if not future.cancelled():
        future.exception()


def _failed(error: BaseException) -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


class MqttUplink:
    """Validates device publishes into envelopes and submits them (one per message)."""

    def __init__(
        self,
        dispatcher: EnvelopeSink,
        metrics: Metrics,
        topic_root: str,
        limits: PayloadLimits = DEFAULT_LIMITS,
    ) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._root = topic_root
        self._limits = limits
        # Looked up once: `labels()` costs a lock and a dict lookup per call.
        self._received = metrics.messages_received.labels("mqtt")
        self._invalid = metrics.invalid_payloads.labels("mqtt")

    @property
    def room(self) -> Room:
        """The dispatcher's room: device connections stop reading while it is full."""
        return self._dispatcher.room

    def own_topic(self, topic: str, sender: str) -> DeviceTopic | None:
        """What `topic` names when it is an uplink topic of `sender`; else None."""
        parsed = parse_topic(topic, self._root)
        if parsed is None or parsed.device_id != sender:
            return None
        return parsed

    def submit(
        self, topic: str, data: bytes | bytearray, *, sender: str | None
    ) -> asyncio.Future[None] | None:
        """Bridge one publish. Returns the dispatcher's future (resolves once the
        envelope is durable), or None when there is nothing to bridge: not an
        uplink topic, not the sender's own topic, or an invalid payload (counted
        and logged here). `sender` is the authenticated device, or None when the
        broker's own ACL vouches for the topic (external-broker mode).

        Call on the event loop thread.
        """
        parsed = parse_topic(topic, self._root)
        if parsed is None or (sender is not None and parsed.device_id != sender):
            return None
        return self.submit_parsed(parsed, topic, data)

    def submit_parsed(
        self, parsed: DeviceTopic, topic: str, data: bytes | bytearray, *, shared: bool = False
    ) -> asyncio.Future[None] | None:
        """`submit` for a topic already parsed (the fast path parses it first).
        With `shared`, the future may be the one of the envelope's whole batch
        (`EnvelopeSink.submit_batched`): never cancel it."""
        self._received.inc()
        try:
            envelope = envelope_from_payload(parsed, bytes(data), limits=self._limits)
        except EnvelopeError as exc:
            self._invalid.inc()
            log.warning(
                "MQTT payload refused: device=%s topic=%s reason=%s", parsed.device_id, topic, exc
            )
            return None
        try:
            if shared:
                return self._dispatcher.submit_batched(envelope)
            return self._dispatcher.submit(envelope)
        except DispatchError as exc:
            # Shutting down: the device gets no acknowledgement and sends again.
            return _failed(exc)

    def presence(self, device_id: str, *, online: bool, since: datetime) -> None:
        """Record a connect or disconnect of the connection accepted at `since`
        (best effort, nobody is acknowledged; ordered by hub/presence.py)."""
        try:
            future = self._dispatcher.submit(
                presence_envelope(
                    device_id, online=online, since=since, transport="mqtt", protocol="mqtt"
                )
            )
        except HubError:
            return
        future.add_done_callback(_consume)


def may_acknowledge(future: asyncio.Future[None], what: str) -> bool:
    """Whether the message of a done dispatcher future may be acknowledged:
    only when the envelope became durable. A failure is logged here, once
    (a `DispatchError` is the hub shutting down or its spool full: the device,
    or the external broker, sends the message again)."""
    if future.cancelled():
        return False
    error = future.exception()
    if error is None:
        return True
    if isinstance(error, DispatchError):
        log.info("MQTT message not acknowledged (%s): %s", what, error)
    else:
        log.error("MQTT message not acknowledged (%s): the dispatcher failed", what, exc_info=error)
    return False


async def wait_durable(future: asyncio.Future[None], what: str) -> bool:
    """Wait for a dispatcher future; True once durable (`may_acknowledge`).

    The future is shielded: a connection that closes while waiting cancels its
    own wait, never the dispatcher's future (which other code resolves).
    """
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        raise
    except Exception:
        pass  # judged by may_acknowledge, from the future itself
    return may_acknowledge(future, what)


@dataclass(frozen=True, slots=True)
class TapConfig:
    """What each connection's handler needs from the embedded broker."""

    uplink: MqttUplink
    metrics: Metrics
    max_inflight: int
    #: With an ACL file: its rules may narrow what a device's publish bridges
    #: (connections then get an `AclBridgingHandler`). None without a file.
    acl: DeviceAccess | None = None
    #: Whether some session holds a subscription matching a topic (the
    #: broker's subscription index): a publish there takes the slow path, so
    #: that amqtt delivers it. Set by the broker; None turns the fast path off.
    subscribed: Callable[[str], bool] | None = None


class BridgingHandler(QosFlowHandler):
    """amqtt's broker-side handler with the bridge tap; see the module docstring."""

    # Slots keep the instance dict (amqtt's attributes) small (see QosFlowHandler).
    __slots__ = (
        "_consumed",
        "_own_topics",
        "acks",
        "announced",
        "connected_at",
        "counted",
        "finished",
        "framed",
        "passed_on",
        "started",
        "taken",
        "tap",
    )  # fmt: skip

    tap: TapConfig

    def __init__(self, *args: object, tap: TapConfig, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.tap = tap
        self.framed: PacketReader | None = None
        self.started = False  # the CONNECT was accepted and messages flow
        self.counted = False
        # When the CONNECT was accepted: names this connection in its presence.
        self.connected_at = datetime.now(UTC)
        # Reported to the downlink as holding its device (subscribed to its commands).
        self.announced = False
        # Set by the broker once this connection's session handling has ended
        # (a newer connection with the same client id waits for it).
        self.finished: asyncio.Event = LeanEvent()
        # amqtt's queues of SUBSCRIBE and UNSUBSCRIBE packets, made lean
        # (bridges.mqtt.state): most connections subscribe once, ever.
        # (amqtt's fields: mypy takes the slots for all there is.)
        self._pending_subscriptions: LeanQueue[Subscription] = LeanQueue()  # type: ignore[misc]
        self._pending_unsubscriptions: LeanQueue[UnSubscription] = LeanQueue()  # type: ignore[misc]
        # The connection's PUBACKs, in the order the QoS 1 PUBLISHes came (MQTT
        # 3.1.1 section 4.6), those of the fast path and amqtt's (bridges.mqtt.acks).
        self.acks: AckSequencer | None = None
        # Uplink topics this connection published on, parsed (the fast path).
        self._own_topics: dict[str, DeviceTopic | None] = {}
        self._consumed: asyncio.Future[None] | None = None
        # The message amqtt's message loop took from the session's queue and
        # has not handled yet, and one the broker passed on ahead of the loop
        # because the connection ended (see bridges.mqtt.delivery, `_handle_disconnect`).
        self.taken: ApplicationMessage | None = None
        self.passed_on: ApplicationMessage | None = None

    def attach(self, session: Session, reader: ReaderAdapter, writer: object) -> None:
        super().attach(session, reader, writer)
        self.acks = AckSequencer(
            write=self._write_acks,
            drain=self._drain,
            judge=self._may_acknowledge,
            max_inflight=self.tap.max_inflight,
            on_acked=self.tap.metrics.messages_acked.labels("mqtt").inc,
        )
        if isinstance(reader, PacketReader):
            self.framed = reader
            reader.peer = f"{session.client_id} ({device_of(session)})"
            self.acks.attach(reader)

    async def start(self) -> None:
        await super().start()
        self.started = True
        if (
            self.framed is not None
            and self.tap.subscribed is not None
            and device_of(self.session) is not None
        ):
            # From the next packet on, the reader offers each PUBLISH to the
            # fast path first (docs/mqtt.md, "The fast path").
            self.framed.fast_publish = self._fast_publish
        if not self.counted:
            self.counted = True
            self.connected_at = datetime.now(UTC)
            self.tap.metrics.connections.labels("mqtt").inc()
            device_id = device_of(self.session)
            if device_id is not None:
                self.tap.uplink.presence(device_id, online=True, since=self.connected_at)

    def uncount(self, session: Session) -> None:
        """Called by the broker when this connection's session ended."""
        if self.counted:
            self.counted = False
            self.tap.metrics.connections.labels("mqtt").dec()
            device_id = device_of(session)
            if device_id is not None:
                self.tap.uplink.presence(device_id, online=False, since=self.connected_at)

    async def mqtt_deliver_next_message(self) -> ApplicationMessage | None:
        message: ApplicationMessage | None = await super().mqtt_deliver_next_message()
        self.taken = message
        return message

    async def stop(self) -> None:
        if self.framed is not None:
            self.framed.fast_publish = None
            self.framed.stop_watching()
        if self.acks is not None:
            # Nothing more is written on this connection; messages still waiting
            # become durable unacknowledged (the device sends them again).
            self.acks.close()
        await super().stop()

    def handle_read_timeout(self) -> None:
        """amqtt calls this after each keep-alive period without a packet. The
        keep-alive is enforced by the `PacketReader` instead, at the 1.5 times
        the specification asks for [MQTT-3.1.2-24]; nothing to do here."""

    # -- acknowledgement flows -------------------------------------------------------

    async def mqtt_connack_authorize(self, authorize: bool) -> None:
        if authorize or self.session is None:
            await super().mqtt_connack_authorize(authorize)
            return
        # Stock amqtt answers every refusal with "not authorized" and may set
        # session-present; a wrong credential is "bad user name or password",
        # and a refused CONNACK never has session-present [MQTT-3.2.2-4].
        reason = state_of(self.session).refusal
        code = (
            BAD_USERNAME_PASSWORD if reason in (UNKNOWN_DEVICE, BAD_CREDENTIAL) else NOT_AUTHORIZED
        )
        await self._send_packet(ConnackPacket.build(0, code))

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        qos = publish_packet.qos
        if qos == QOS_2 and self._known_qos2(publish_packet):
            # A resend of a QoS 2 message already received (PUBREC sent or
            # lost): answered with PUBREC again, bridged and delivered once.
            await super().handle_publish(publish_packet)
            return
        durable = self._tap(publish_packet)
        if qos == QOS_0:
            if durable is not None:
                durable.add_done_callback(_consume)
            await super().handle_publish(publish_packet)
        elif qos == QOS_1:
            await self._publish_qos1(publish_packet, durable)
        elif durable is None or await wait_durable(durable, self._describe(publish_packet)):
            # QoS 2: the PUBREC the stock flow sends first waits for durability too.
            await super().handle_publish(publish_packet)

    def _known_qos2(self, publish_packet: PublishPacket) -> bool:
        header = publish_packet.variable_header
        return (
            self.session is not None
            and header is not None
            and header.packet_id in self.session.inflight_in
        )

    def _tap(self, publish_packet: PublishPacket) -> asyncio.Future[None] | None:
        try:
            device_id = device_of(self.session)
            topic, data = publish_packet.topic_name, publish_packet.data
            if device_id is None or topic is None or data is None:
                return None  # anonymous clients are never bridged
            return self.tap.uplink.submit(topic, data, sender=device_id)
        except Exception:
            # The boundary with amqtt: a bug in the tap must not kill the connection.
            log.exception("MQTT bridge failed on a publish: %s", self._describe(publish_packet))
            self.tap.metrics.protocol_errors.labels("mqtt", "bridge_error").inc()
            return None

    async def _publish_qos1(
        self, publish_packet: PublishPacket, durable: asyncio.Future[None] | None
    ) -> None:
        acks = self.acks
        # Taken before the first await: the reader reads the next packet only
        # after this task has started (bridges.mqtt.reader), so this PUBACK's
        # place comes before those of every later PUBLISH, fast or slow.
        turn = acks.add_slow() if acks is not None else None
        try:
            ok = durable is None or await wait_durable(durable, self._describe(publish_packet))
            if turn is not None:
                await turn.wait()
            if ok:
                # The stock flow: queue for the broker's subscribers, send PUBACK.
                await super().handle_publish(publish_packet)
                if durable is not None:
                    self.tap.metrics.messages_acked.labels("mqtt").inc()
        finally:
            if acks is not None and turn is not None:
                acks.finish(turn)

    # -- the fast path --------------------------------------------------------------

    def _fast_publish(self, flags: int, body: bytes) -> bool:
        """The reader offers a checked PUBLISH here first (docs/mqtt.md, "The
        fast path"). A QoS 0 or 1 PUBLISH of this connection's device, on one
        of its own uplink topics that the ACL lets it publish on, not
        retained, and with no subscription matching it, is bridged here and
        never reaches amqtt: True. Anything else goes to amqtt: False."""
        qos = (flags >> 1) & 0x03
        if qos == QOS_2 or flags & 0x01:
            return False  # QoS 2 and retained messages: amqtt's flows
        try:
            size = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + size].decode()  # UTF-8 checked by the reader
            parsed = self._own_topic(topic)
            if parsed is None:
                return False
            subscribed = self.tap.subscribed
            if subscribed is None or subscribed(topic):
                return False  # a subscriber: amqtt delivers it (at its QoS)
            at = 2 + size
            packet_id = 0
            if qos == QOS_1:
                packet_id = int.from_bytes(body[at : at + 2], "big")
                at += 2
            durable = self.tap.uplink.submit_parsed(parsed, topic, body[at:], shared=True)
        except Exception:
            # The boundary with amqtt: a bug here must not kill the connection;
            # amqtt's path, with its own tap, handles the packet instead.
            log.exception("MQTT fast path failed on a publish: device=%s", device_of(self.session))
            self.tap.metrics.protocol_errors.labels("mqtt", "bridge_error").inc()
            return False
        if qos == QOS_0:
            if durable is not None and durable is not self._consumed:
                # One callback per batch future (the dispatcher retrieves a
                # batch's failure itself; this is for a refusal at shutdown).
                self._consumed = durable
                durable.add_done_callback(_consume)
        elif self.acks is not None:
            self.acks.add_fast(packet_id, durable)
        return True

    def _own_topic(self, topic: str) -> DeviceTopic | None:
        """The device's own uplink topic `topic` names, if its ACL allows it."""
        known = self._own_topics
        if topic in known:
            parsed = known[topic]
        else:
            device_id = device_of(self.session)
            parsed = None if device_id is None else self.tap.uplink.own_topic(topic, device_id)
            if len(known) >= _OWN_TOPICS_KEPT:
                known.clear()  # a device naming ever new topics: bounded
            known[topic] = parsed
        if parsed is None:
            return None
        acl = self.tap.acl
        if acl is not None and not acl.may_publish(self.session, topic):
            return None  # refused: amqtt counts, logs and acknowledges it
        return parsed

    def _write_acks(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or self._closed:
            raise ConnectionError("the connection is closed")
        if isinstance(writer, WebSocketWriter):
            writer.send_now(data)  # in a frame of its own: the sequencer drains rarely
        else:
            writer.write(data)

    async def _drain(self) -> None:
        writer = self.writer
        if writer is not None and not self._closed:
            await writer.drain()

    def _may_acknowledge(self, future: asyncio.Future[None]) -> bool:
        return may_acknowledge(future, self._describe_connection())

    def _describe_connection(self) -> str:
        client_id = self.session.client_id if self.session is not None else None
        return f"device={device_of(self.session)} client_id={client_id}"

    def _describe(self, publish_packet: PublishPacket) -> str:
        client_id = self.session.client_id if self.session is not None else None
        return (
            f"device={device_of(self.session)} client_id={client_id} "
            f"topic={publish_packet.topic_name}"
        )


class AclBridgingHandler(BridgingHandler):
    """`BridgingHandler` for a broker with an ACL file: a device's publish the
    file refuses is not bridged. The decision is the ACL's own, made once per
    session and topic (`AclFileAccess`): amqtt's check of the same publish,
    which counts and logs the refusal, finds it made. Without a file the plain
    handler runs, and the publish path does no extra work."""

    def _tap(self, publish_packet: PublishPacket) -> asyncio.Future[None] | None:
        acl, topic = self.tap.acl, publish_packet.topic_name
        if (
            acl is not None
            and topic is not None
            and device_of(self.session) is not None
            and not acl.may_publish(self.session, topic)
        ):
            return None  # refused: acknowledged, never bridged or delivered
        return super()._tap(publish_packet)
