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
  It also answers refused CONNECTs with the fitting return code and closes
  clients silent for two keep-alive periods.
- `FramedReader` wraps a connection's byte stream: it follows the MQTT framing
  to refuse packets above `mqtt_max_packet_bytes` from their length field (before
  reading them), to notice the first complete packet (CONNECT), and to stop
  reading between packets while a connection has too many messages waiting to
  become durable (backpressure, `max_inflight_per_connection`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from bridges.mqtt_auth import BAD_CREDENTIAL, REFUSAL_ATTRIBUTE, UNKNOWN_DEVICE, device_of
from hub.envelope import Envelope, Kind
from hub.errors import DispatchError, EnvelopeError, HubError
from hub.metrics import Metrics
from hub.topics import envelope_from_payload, parse_topic

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

    def __init__(self, dispatcher: EnvelopeSink, metrics: Metrics, topic_root: str) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._root = topic_root

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
            envelope = envelope_from_payload(parsed, bytes(data))
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

    def presence(self, device_id: str, *, online: bool) -> None:
        """Record a device's connect or disconnect (best effort, nobody is acknowledged)."""
        try:
            future = self._dispatcher.submit(
                Envelope(
                    device_id=device_id,
                    kind=Kind.PRESENCE,
                    payload={"online": online},
                    transport="mqtt",
                    protocol="mqtt",
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


class PacketTooLarge(HubError):
    """A client announced an MQTT packet above `mqtt_max_packet_bytes`."""


class FramedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A reader adapter that follows MQTT framing; see the module docstring."""

    _HEADER, _LENGTH, _BODY = range(3)

    def __init__(
        self,
        inner: ReaderAdapter,
        max_packet_bytes: int,
        peer: str,
        on_too_large: Callable[[str], None],
    ) -> None:
        self._inner = inner
        self._max = max_packet_bytes
        self._on_too_large = on_too_large
        self.peer = peer
        self.packets = 0
        self._state = self._HEADER
        self._length = 0
        self._multiplier = 1
        self._left = 0
        self._resume = asyncio.Event()
        self._resume.set()

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    async def read(self, n: int = -1) -> bytes:
        if self._state == self._HEADER and not self._resume.is_set():
            # Only between packets: a paused connection has no half-read packet.
            await self._resume.wait()
        data: bytes = await self._inner.read(n)
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def _follow(self, data: bytes) -> None:
        i, size = 0, len(data)
        while i < size:
            if self._state == self._BODY:
                step = min(self._left, size - i)
                self._left -= step
                i += step
                if self._left == 0:
                    self._end_packet()
                continue
            byte = data[i]
            i += 1
            if self._state == self._HEADER:
                self._state, self._length, self._multiplier = self._LENGTH, 0, 1
                continue
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            if byte & 0x80 and self._multiplier <= 128**3:
                continue  # more length bytes; amqtt itself refuses a fifth one
            if self._length > self._max:
                message = (
                    f"MQTT packet of {self._length} bytes from {self.peer} exceeds "
                    f"mqtt_max_packet_bytes ({self._max})"
                )
                self._on_too_large(message)
                # Not an amqtt MQTTError: amqtt would skip those and read on
                # mid-packet; any other exception ends the connection.
                raise PacketTooLarge(message)
            if self._length == 0:
                self._end_packet()
            else:
                self._state, self._left = self._BODY, self._length

    def _end_packet(self) -> None:
        self._state = self._HEADER
        self.packets += 1


class BridgingHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker-side handler with the bridge tap; see the module docstring."""

    tap: TapConfig

    def __init__(self, *args: object, tap: TapConfig, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.tap = tap
        self.framed: FramedReader | None = None
        self.started = False  # the CONNECT was accepted and messages flow
        self.counted = False
        # Reported to the downlink as holding its device (subscribed to its commands).
        self.announced = False
        self._packets_at_timeout = -1
        # Set when this message's PUBACK went out (or was given up); the next
        # QoS 1 message of the connection waits for it, so PUBACKs leave in
        # the order the PUBLISHes came (MQTT 3.1.1 section 4.6, message ordering).
        self._ack_tail: asyncio.Event | None = None
        self._inflight = 0

    def attach(self, session: Session, reader: ReaderAdapter, writer: object) -> None:
        super().attach(session, reader, writer)
        if isinstance(reader, FramedReader):
            self.framed = reader
            reader.peer = f"{session.client_id} ({device_of(session)})"

    async def start(self) -> None:
        await super().start()
        self.started = True
        if not self.counted:
            self.counted = True
            self.tap.metrics.connections.labels("mqtt").inc()
            device_id = device_of(self.session)
            if device_id is not None:
                self.tap.uplink.presence(device_id, online=True)

    def uncount(self, session: Session) -> None:
        """Called by the broker when this connection's session ended."""
        if self.counted:
            self.counted = False
            self.tap.metrics.connections.labels("mqtt").dec()
            device_id = device_of(session)
            if device_id is not None:
                self.tap.uplink.presence(device_id, online=False)

    def handle_read_timeout(self) -> None:
        """amqtt's reader calls this after a keep-alive period without a packet,
        and stock amqtt does nothing, so a vanished client (a half-open TCP
        connection) would stay "connected" for good. MQTT 3.1.1 section 3.1.2.10
        has the server disconnect a client silent for 1.5 keep-alive periods;
        this closes it after the second silent period in a row (2x, so a
        client pinging exactly on time is never cut off)."""
        framed = self.framed
        if framed is None or framed.paused:
            return  # not reading it is our own backpressure, not its silence
        if framed.packets != self._packets_at_timeout:
            self._packets_at_timeout = framed.packets
            return
        log.info(
            "MQTT client %s silent for two keep-alive periods; closing the connection",
            framed.peer,
        )
        if self._reader_task is not None:
            # Called inside the reader task: its next await ends the loop, which
            # then closes the connection the usual way.
            self._reader_task.cancel()

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
        durable = self._tap(publish_packet)
        qos = publish_packet.qos
        if qos == QOS_0:
            if durable is not None:
                durable.add_done_callback(_consume)
            await super().handle_publish(publish_packet)
        elif qos == QOS_1:
            await self._publish_qos1(publish_packet, durable)
        elif durable is None or await wait_durable(durable, self._describe(publish_packet)):
            # QoS 2: the PUBREC the stock flow sends first waits for durability too.
            await super().handle_publish(publish_packet)

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
