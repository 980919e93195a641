"""The QoS 1 and 2 flows of amqtt's broker-side handler, fixed where they break MQTT 3.1.1.

Layer: bridges; imports the `hub` core (`hub.mqtt_rules`) and amqtt.

`QosFlowHandler` is amqtt 0.12.1's `BrokerProtocolHandler` with these
overrides (docs/mqtt.md, "What we override in amqtt"):

- `_send_outgoing` (through `_handle_qos1_message_flow` /
  `_handle_qos2_message_flow` for outgoing messages): outgoing QoS 1 and 2
  messages stay in the session until acknowledged (stock amqtt drops them
  after 5 s or when the connection closes) and are sent again, with DUP,
  when a persistent session reconnects [MQTT-4.4.0-1].
- `_retry_deliveries`: the resends start in order and are not awaited inside
  `start` (stock amqtt waits for every acknowledgement there, and resends
  PUBREC for incoming QoS 2 messages).
- `_handle_qos2_message_flow` (incoming) / `handle_pubrel`: incoming QoS 2
  state lives in the session, so a PUBREL resent after a reconnect is
  answered with PUBCOMP [MQTT-4.3.3-2].
- `_check_ack`, asked by the packet reader (bridges.mqtt.reader): an
  acknowledgement of the wrong type for a message's QoS closes the
  connection [MQTT-4.8.0-1].
- `start`: stock amqtt's, with `LeanEvent`s (bridges.mqtt.lean) for the
  two events of its reader task, which every connection holds as long as it
  lives (an `asyncio.Event` takes about 850 bytes).
- `_reader_loop`: stock amqtt's, but a packet's task is forgotten as soon
  as it is done; stock amqtt kept its tasks in a deque (760 bytes) and a
  done one until the next packet came, so an idle connection held its
  SUBSCRIBE's task (600 bytes) for good.

The publish tap (bridges.mqtt.tap) subclasses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from amqtt.adapters import ReaderAdapter
from amqtt.errors import MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBLISH,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
    MQTTPacket,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, ApplicationMessage, OutgoingApplicationMessage, Session

from bridges.mqtt.lean import LeanEvent
from bridges.mqtt.reader import PacketReader
from hub.mqtt_rules import PUBACK, PUBCOMP, PUBREC

log = logging.getLogger(__name__)

#: The handler method of each packet type amqtt's reader loop runs in a task
#: of its own (amqtt 0.12.1, `ProtocolHandler._reader_loop`); the packet
#: types are MQTT's, the same numbers in `hub.mqtt_rules` and amqtt.
_HANDLERS = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGREQ: "handle_pingreq",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}


class QosFlowHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker-side handler with MQTT 3.1.1's QoS flows; see the module docstring."""

    # Slots, not the instance dict: past 30 attributes an instance dict no
    # longer shares its keys with the others of its class and costs ~1.5 KB.
    __slots__ = ("_closed", "_resends")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._closed = False
        # The resend tasks running, made on first resend (`_spawn`).
        self._resends: set[asyncio.Task[None]] | None = None

    async def start(self) -> None:
        # `ProtocolHandler.start` and `BrokerProtocolHandler.start` of amqtt
        # 0.12.1, with lean events. (mypy takes the slots for all there is:
        # amqtt's untyped base class keeps its fields in the instance dict.)
        if not self._is_attached():
            raise ProtocolHandlerError("Handler is not attached to a stream")
        self._reader_ready = LeanEvent()  # type: ignore[misc]
        self._reader_stopped = LeanEvent()  # type: ignore[misc]
        self._reader_task = asyncio.create_task(self._reader_loop())  # type: ignore[misc]
        await self._reader_ready.wait()
        if self.keepalive_timeout is not None:
            self._keepalive_task = self._loop.call_later(  # type: ignore[misc]
                self.keepalive_timeout, self.handle_write_timeout
            )
        await self._retry_deliveries()
        ended: asyncio.Future[Any] | None = getattr(self, "_disconnect_waiter", None)
        if ended is None or ended.done():
            self._disconnect_waiter: asyncio.Future[Any] = asyncio.Future()  # type: ignore[misc]

    def attach(self, session: Session, reader: ReaderAdapter, writer: object) -> None:
        super().attach(session, reader, writer)
        if isinstance(reader, PacketReader):
            reader.check_ack = self._check_ack

    async def stop(self) -> None:
        self._closed = True
        await super().stop()

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

    async def _reader_loop(self) -> None:
        # amqtt 0.12.1's, but with the packets' tasks forgotten once done.
        if self.session is None or not self._reader_ready:
            raise ProtocolHandlerError("Handler is not started")
        running: set[asyncio.Task[None]] = set()
        keepalive_timeout: int | None = self.session.keep_alive
        if keepalive_timeout is not None and keepalive_timeout <= 0:
            keepalive_timeout = None
        while True:
            try:
                self._reader_ready.set()
                if self.reader is None:
                    break
                fixed_header = await asyncio.wait_for(
                    MQTTFixedHeader.from_stream(self.reader), timeout=keepalive_timeout
                )
                if not fixed_header:
                    break  # end of stream
                packet_type = fixed_header.packet_type
                if packet_type in (RESERVED_0, RESERVED_15):
                    await self.handle_connection_closed()
                    continue
                packet = await packet_class(fixed_header).from_stream(
                    self.reader, fixed_header=fixed_header
                )
                await self.plugins_manager.fire_event(
                    MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session
                )
                if packet_type == CONNECT:
                    # Awaited, as stock amqtt does (it only logs the error).
                    await self.handle_connect(packet)
                    continue
                name = _HANDLERS.get(packet_type)
                if name is None:
                    continue
                task = asyncio.create_task(getattr(self, name)(packet))
                running.add(task)
                task.add_done_callback(running.discard)
            except MQTTError:
                pass  # stock amqtt: the packet is discarded
            except asyncio.CancelledError:
                break
            except TimeoutError:
                self.handle_read_timeout()
            except NoDataError:
                pass
            except Exception:
                log.warning("%s: unhandled error in the reader", type(self).__name__, exc_info=True)
                break
        for task in list(running):
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

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
        if self._resends is None:
            self._resends = set()
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
