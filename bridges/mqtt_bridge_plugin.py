"""The MQTT bridge's tap: device publishes in, envelopes to the dispatcher, PUBACK once durable.

Layer: bridges; imports the `hub` core, `bridges.mqtt_auth` and amqtt. Must not
import `tasks`, `firmware_sim`, `hub.cli` or `hub.app`.

- `MqttUplink` turns a publish on an uplink topic into an envelope and submits
  it; the embedded broker and the external-broker bridge share it.
- `BridgingHandler` is amqtt's broker-side protocol handler with the tap built
  in. Stock amqtt 0.12.1 sends the PUBACK of an incoming QoS 1 PUBLISH right
  after queueing the message for the broker (`ProtocolHandler.
  _handle_qos1_message_flow`), before any plugin hook has run, so no plugin can
  hold the PUBACK back. `handle_publish` is the one method that receives each
  PUBLISH, in a task of its own per packet; this subclass submits the envelope
  there, waits for the dispatcher's future, and only then hands the packet to
  the stock flow, which queues it for the broker and sends the PUBACK (QoS 1)
  or PUBREC (QoS 2). Waiting happens in that per-packet task, so one slow
  message holds back neither the reader of its connection nor any other client.
  It also answers refused CONNECTs with the fitting return code.
- The same handler replaces amqtt's QoS flows where they break MQTT 3.1.1:
  outgoing QoS 1 and 2 messages stay in the session until acknowledged (stock
  amqtt drops them after 5 s or when the connection closes) and are sent again,
  with DUP, when a persistent session reconnects [MQTT-4.4.0-1]; incoming QoS 2
  state lives in the session, so a PUBREL resent after a reconnect is answered
  with PUBCOMP [MQTT-4.3.3-2]; and an acknowledgement of the wrong type for a
  message's QoS closes the connection [MQTT-4.8.0-1].
- Each connection is read through a `bridges.mqtt_packets.PacketReader`
  (checked packets, size limit, CONNECT timeout, keep-alive); the handler
  pauses it while the connection has too many messages waiting to become
  durable (backpressure, `max_inflight_per_connection`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.packet import MQTTPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, ApplicationMessage, OutgoingApplicationMessage, Session

from bridges.mqtt_auth import BAD_CREDENTIAL, REFUSAL_ATTRIBUTE, UNKNOWN_DEVICE, device_of
from bridges.mqtt_packets import PUBACK, PUBCOMP, PUBREC, PacketReader
from hub.envelope import Envelope
from hub.errors import DispatchError, EnvelopeError, HubError
from hub.metrics import Metrics
from hub.topics import DEFAULT_LIMITS, PayloadLimits, parse_topic
from hub.uplink import envelope_from_payload, presence_envelope

log = logging.getLogger(__name__)


class EnvelopeSink(Protocol):
    """What the MQTT bridges need of the dispatcher (bridges.dispatch.Dispatcher)."""

    def submit(self, envelope: Envelope) -> asyncio.Future[None]: ...


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
        self._metrics.messages_received.labels("mqtt").inc()
        try:
            envelope = envelope_from_payload(parsed, bytes(data), limits=self._limits)
        except EnvelopeError as exc:
            self._metrics.invalid_payloads.labels("mqtt").inc()
            log.warning(
                "MQTT payload refused: device=%s topic=%s reason=%s", parsed.device_id, topic, exc
            )
            return None
        try:
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


async def wait_durable(future: asyncio.Future[None], what: str) -> bool:
    """Wait for a dispatcher future; True once durable, False when it failed.

    The future is shielded: a connection that closes while waiting cancels its
    own wait, never the dispatcher's future (which other code resolves).
    """
    try:
        await asyncio.shield(future)
    except DispatchError as exc:
        log.info("MQTT message not acknowledged (%s): %s", what, exc)
        return False
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("MQTT message not acknowledged (%s): the dispatcher failed", what)
        return False
    return True


@dataclass(frozen=True, slots=True)
class TapConfig:
    """What each connection's handler needs from the embedded broker."""

    uplink: MqttUplink
    metrics: Metrics
    max_inflight: int


class BridgingHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker-side handler with the bridge tap; see the module docstring."""

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
        self.finished = asyncio.Event()
        self._closed = False
        self._resends: set[asyncio.Task[None]] = set()
        # Set when this message's PUBACK went out (or was given up); the next
        # QoS 1 message of the connection waits for it, so PUBACKs leave in
        # the order the PUBLISHes came (MQTT 3.1.1 section 4.6, message ordering).
        self._ack_tail: asyncio.Event | None = None
        self._inflight = 0
        # The message amqtt's message loop took from the session's queue and
        # has not handled yet, and one the broker passed on ahead of the loop
        # because the connection ended (see HubBroker._handle_disconnect).
        self.taken: ApplicationMessage | None = None
        self.passed_on: ApplicationMessage | None = None

    def attach(self, session: Session, reader: ReaderAdapter, writer: object) -> None:
        super().attach(session, reader, writer)
        if isinstance(reader, PacketReader):
            self.framed = reader
            reader.peer = f"{session.client_id} ({device_of(session)})"
            reader.check_ack = self._check_ack

    async def start(self) -> None:
        await super().start()
        self.started = True
        if not self.counted:
            self.counted = True
            self.connected_at = datetime.now(UTC)
            self.tap.metrics.connections.labels("mqtt").inc()
            device_id = device_of(self.session)
            if device_id is not None:
                self.tap.uplink.presence(device_id, online=True, since=self.connected_at)

    async def stop(self) -> None:
        self._closed = True
        await super().stop()

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

    def handle_read_timeout(self) -> None:
        """amqtt calls this after each keep-alive period without a packet. The
        keep-alive is enforced by the `PacketReader` instead, at the 1.5 times
        the specification asks for [MQTT-3.1.2-24]; nothing to do here."""

    # -- acknowledgement flows -------------------------------------------------------

    def _check_ack(self, packet_type: int, packet_id: int) -> str | None:
        """Why an acknowledgement from the client does not fit the flow of the
        message it names (None: it fits, or names no message in flight, which
        is a late duplicate and ignored). A PUBACK for a QoS 2 message, or a
        PUBREC or PUBCOMP for a QoS 1 one, breaks the protocol [MQTT-4.3.2-1],
        [MQTT-4.3.3-1] and closes the connection [MQTT-4.8.0-1]."""
        message = self.session.inflight_out.get(packet_id) if self.session is not None else None
        if message is None:
            return None
        name = {PUBACK: "PUBACK", PUBREC: "PUBREC", PUBCOMP: "PUBCOMP"}[packet_type]
        if message.qos == QOS_1 and packet_type != PUBACK:
            return f"{name} for packet {packet_id}, a QoS 1 message"
        if message.qos == QOS_2 and packet_type == PUBACK:
            return f"PUBACK for packet {packet_id}, a QoS 2 message"
        if packet_type == PUBCOMP and message.pubrec_packet is None:
            return f"PUBCOMP for packet {packet_id} before its PUBREC"
        return None

    async def _retry_deliveries(self) -> None:
        # Stock amqtt waits here (inside `start`) until every resent message is
        # acknowledged, and resends PUBREC for incoming QoS 2 messages. The
        # specification asks for unacknowledged PUBLISH (with DUP) and PUBREL
        # packets to be sent again on reconnect, in their original order
        # [MQTT-4.4.0-1], [MQTT-4.6.0-1]. Tasks started in order write in order
        # (the write lock is fair); the acknowledgements are awaited there.
        if self.session is None:
            return
        for message in list(self.session.inflight_out.values()):
            self._spawn(self._send_outgoing(message))

    def _spawn(self, flow: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(flow)
        self._resends.add(task)
        task.add_done_callback(self._resends.discard)

    async def _handle_qos1_message_flow(self, app_message: ApplicationMessage) -> None:
        if getattr(app_message, "direction", None) == OUTGOING:
            await self._send_outgoing(app_message)
        else:
            await super()._handle_qos1_message_flow(app_message)

    async def _handle_qos2_message_flow(self, app_message: ApplicationMessage) -> None:
        if getattr(app_message, "direction", None) == OUTGOING:
            await self._send_outgoing(app_message)
            return
        # Incoming: kept in the session (so it outlives this connection) until
        # the PUBREL, and delivered onwards then; a resent PUBLISH with the
        # same identifier is not delivered twice [MQTT-4.3.3-2].
        if self.session is None or app_message.packet_id is None:
            return
        self.session.inflight_in.setdefault(app_message.packet_id, app_message)
        await self._send_packet(PubrecPacket.build(app_message.packet_id))

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        # Answered with PUBCOMP whether or not the message is still known: after
        # a reconnect the client resends its PUBREL, and a PUBCOMP it never got
        # may be why [MQTT-4.3.3-2], [MQTT-4.4.0-1].
        packet_id = pubrel.packet_id
        message = self.session.inflight_in.pop(packet_id, None) if self.session else None
        if message is not None and self.session is not None:
            await self.session.delivered_message_queue.put(message)
        await self._send_packet(PubcompPacket.build(packet_id))

    async def _send_outgoing(self, message: OutgoingApplicationMessage) -> None:
        """A QoS 1 or 2 message to the client. It stays in the session's
        `inflight_out` until fully acknowledged, however long that takes: if the
        connection closes first, a persistent session sends it again on the
        next connection (with DUP), where stock amqtt gave up after 5 s."""
        session, packet_id = self.session, message.packet_id
        if session is None or packet_id is None:
            return
        session.inflight_out[packet_id] = message
        if message.qos == QOS_1 or message.pubrec_packet is None:
            # DUP on a resend of a PUBLISH the client may have seen [MQTT-3.3.1-1].
            publish = message.build_publish_packet(dup=message.publish_packet is not None)
            waiters = self._puback_waiters if message.qos == QOS_1 else self._pubrec_waiters
            ack = await self._exchange(publish, waiters, packet_id)
            message.publish_packet = publish
            if ack is None:
                return  # the connection closed; the session keeps the message
            if message.qos == QOS_1:
                message.puback_packet = ack
                session.inflight_out.pop(packet_id, None)
                return
            message.pubrec_packet = ack
        message.pubrel_packet = PubrelPacket.build(packet_id)
        complete = await self._exchange(message.pubrel_packet, self._pubcomp_waiters, packet_id)
        if complete is not None:
            message.pubcomp_packet = complete
            session.inflight_out.pop(packet_id, None)

    async def _exchange(
        self, packet: MQTTPacket[Any, Any, Any], waiters: dict[int, Any], packet_id: int
    ) -> Any:
        """Send `packet` and wait for the client's answer to it; None when the
        connection closed first."""
        if self._closed:
            return None
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            if self._closed:
                return None
            return await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if waiter.cancelled() and (task is None or not task.cancelling()):
                return None  # amqtt cancels the waiters when the connection closes
            raise
        finally:
            if waiters.get(packet_id) is waiter:
                del waiters[packet_id]

    async def mqtt_connack_authorize(self, authorize: bool) -> None:
        if authorize or self.session is None:
            await super().mqtt_connack_authorize(authorize)
            return
        # Stock amqtt answers every refusal with "not authorized" and may set
        # session-present; a wrong credential is "bad user name or password",
        # and a refused CONNACK never has session-present [MQTT-3.2.2-4].
        reason = self.session.attributes.get(REFUSAL_ATTRIBUTE)
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
        previous, mine = self._ack_tail, asyncio.Event()
        self._ack_tail = mine
        self._inflight += 1
        if self.framed is not None and self._inflight >= self.tap.max_inflight:
            self.framed.pause()
        try:
            ok = durable is None or await wait_durable(durable, self._describe(publish_packet))
            if previous is not None:
                await previous.wait()
            if ok:
                # The stock flow: queue for the broker's subscribers, send PUBACK.
                await super().handle_publish(publish_packet)
                if durable is not None:
                    self.tap.metrics.messages_acked.labels("mqtt").inc()
        finally:
            mine.set()
            if self._ack_tail is mine:
                self._ack_tail = None
            self._inflight -= 1
            if self.framed is not None and self._inflight < self.tap.max_inflight:
                self.framed.resume()

    def _describe(self, publish_packet: PublishPacket) -> str:
        client_id = self.session.client_id if self.session is not None else None
        return (
            f"device={device_of(self.session)} client_id={client_id} "
            f"topic={publish_packet.topic_name}"
        )
