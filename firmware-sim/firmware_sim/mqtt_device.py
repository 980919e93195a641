"""A simulated device speaking MQTT 3.1.1 to the hub's broker, thousands per event loop.

Over 400 lines: the paho wiring (`_Link`) and the device that drives it change
together; apart, each would need the other's internals.

Layer: firmware simulator; imports the hub core only (`hub.topics`, the one
definition of the topic scheme), never bridges or tasks.

Topics (built with `hub.topics`; `devices` is `topic_root`):

- publishes `devices/<id>/telemetry` at the chosen QoS:
  `{"seq": 5, "boot": 123456, "ts": 1732450000000, "values": {...}}`,
  seq counting up from 1 per boot;
- subscribes to `devices/<id>/commands` at QoS 1, where the hub publishes
  `{"id": "<command id>", "name": "...", "args": {...}}`;
- answers on `devices/<id>/commands/<command id>/result` at QoS 1 with
  `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.

paho-mqtt is driven from the asyncio loop through its external-loop API
(`loop_read`/`loop_write`/`loop_misc` and the socket callbacks registering
the socket with `add_reader`/`add_writer`), so a fleet costs no thread per
client. Only the blocking TCP connect of `Client.connect()` runs in the
loop's default executor, so a slow host does not stall the other devices.

At QoS 1 a message is acknowledged by its PUBACK. At QoS 0 there is no
acknowledgement: a message counts as acknowledged once paho has written it to
the socket. Each connection uses a fresh client that keeps no broker state; the
simulator itself resends unacknowledged messages (same seq, boot id and
timestamp) after a reconnect, as for TCP.

With a fault in the options, the client writes to a
`firmware_sim.outbox.FaultySocket`, which passes every write through the
fault; without one, paho writes to its socket directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.device import AckHook, ConnectionEnd, SimulatedDevice
from firmware_sim.faults import Fault
from firmware_sim.options import FleetOptions, client_ssl_context
from firmware_sim.outbox import FaultySocket
from firmware_sim.pacing import ConnectLimiter
from firmware_sim.summary import FleetStats
from hub.envelope import Kind
from hub.errors import EnvelopeError
from hub.topics import command_result_topic, command_topic, data_topic, validate_command_id

__all__ = ["PERMANENT_CONNACK_CODES", "MqttDevice", "telemetry_payload"]

log = logging.getLogger("firmware_sim.mqtt")

#: CONNACK reason codes after which retrying cannot help: 134 "bad user name or
#: password" and 135 "not authorized" (MQTT 3.1.1 return codes 4 and 5 as paho
#: reports them).
PERMANENT_CONNACK_CODES = frozenset({134, 135})

# paho checks keepalive timers in loop_misc; far below the 30 s keepalive.
_MISC_INTERVAL_S = 1.0
# In-flight QoS 1 slots beyond the telemetry window, for command results.
_RESULT_HEADROOM = 16

_Sent = tuple[str, int | str]  # ("t", telemetry seq) or ("r", command id)


def telemetry_payload(seq: int, boot_id: int, values: dict[str, float]) -> bytes:
    """The payload of one telemetry message, stamped with the device's clock now:
    `{"seq", "boot", "ts" (Unix ms), "values"}` (docs/mqtt.md)."""
    body = {"seq": seq, "boot": boot_id, "ts": int(time.time() * 1000), "values": values}
    return json.dumps(body, separators=(",", ":")).encode()


class _Link:
    """One MQTT connection: a paho client wired to the event loop."""

    def __init__(self, device: MqttDevice, loop: asyncio.AbstractEventLoop) -> None:
        self.device = device
        self.loop = loop
        self._loop_thread = threading.get_ident()
        self.subscribed = False
        self.refusal: ReasonCode | None = None
        self.closed = False
        self.failure: str | None = None
        # mid -> what it carried; `early` holds mids whose on_publish came
        # before publish() returned (possible at QoS 0, when writes are immediate).
        self.pending: dict[int, _Sent] = {}
        self.early: set[int] = set()

        client_class = mqtt.Client if device.fault is None else _FaultyClient
        client = client_class(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(device.device_id, device.credential)
        client.max_inflight_messages_set(device.window + _RESULT_HEADROOM)
        client.connect_timeout = device.connect_timeout_s
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        if device.ssl_context is not None:
            client.tls_set_context(device.ssl_context)
        if isinstance(client, _FaultyClient) and device.fault is not None:
            client.fault = device.fault
            client.event_loop = loop
        self.client = client

    # -- event loop wiring ---------------------------------------------------

    def _on_loop(self, action: Callable[[], None]) -> None:
        # connect() runs in an executor thread and opens the socket there; the
        # loop's reader/writer registry may only be touched from the loop thread.
        if threading.get_ident() == self._loop_thread:
            action()
        else:
            self.loop.call_soon_threadsafe(action)

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(lambda: self.loop.add_reader(sock, self._readable))

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def forget() -> None:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)

        self._on_loop(forget)

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(lambda: self.loop.add_writer(sock, self._writable))

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def forget() -> None:
            self.loop.remove_writer(sock)

        self._on_loop(forget)

    def _readable(self) -> None:
        try:
            self.client.loop_read()
        except Exception as exc:  # a bug here must not kill the loop's reader
            log.exception("%s: error while reading", self.device.device_id)
            self._fail(f"internal error while reading: {exc}")

    def _writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as exc:
            log.exception("%s: error while writing", self.device.device_id)
            self._fail(f"internal error while writing: {exc}")

    async def misc_loop(self) -> None:
        while not self.closed:
            self.client.loop_misc()
            await asyncio.sleep(_MISC_INTERVAL_S)

    def connect(self, host: str, port: int, keepalive: int) -> None:
        """Blocking TCP connect and CONNECT (run in an executor)."""
        self.client.connect(host, port, keepalive=keepalive)

    def _fail(self, reason: str) -> None:
        self.failure = self.failure or reason
        self.force_close()

    def force_close(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
            sock.close()
        self._mark_closed()

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.device._wake.set()

    async def close(self) -> None:
        """Disconnect cleanly when still connected; bounded, then forced."""
        if not self.closed and self.client.socket() is not None:
            self.client.disconnect()
            # The DISCONNECT goes out on the next writable event; paho then closes.
            await self.device._wait_for(lambda: self.closed, 1.0)
        if not self.closed or self.client.socket() is not None:
            self.force_close()

    # -- paho callbacks (on the loop thread, from loop_read/loop_write) -------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            self.refusal = reason_code
            self.device._wake.set()
            return
        client.subscribe(self.device.command_topic, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Any,
    ) -> None:
        if any(rc.is_failure for rc in reason_codes):
            # The device still works without commands; say so, do not fail it.
            log.warning(
                "%s: the broker refused the subscription to %s",
                self.device.device_id,
                self.device.command_topic,
            )
        self.subscribed = True
        self.device._wake.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure and self.failure is None:
            self.failure = f"connection lost ({reason_code})"
        self._mark_closed()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        sent = self.pending.pop(mid, None)
        if sent is None:
            self.early.add(mid)
            return
        self.device._published(sent)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.device.command_topic:
            self.device._command(message.payload)

    # -- publishing ------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, sent: _Sent) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Not connected any more: the message stays outstanding and is
            # resent on the next connection.
            log.debug("%s: publish failed: %s", self.device.device_id, mqtt.error_string(info.rc))
            return
        if info.mid in self.early:
            self.early.discard(info.mid)
            self.device._published(sent)
        else:
            self.pending[info.mid] = sent


class _FaultyClient(mqtt.Client):
    """A paho client whose socket is a `firmware_sim.outbox.FaultySocket`."""

    fault: Fault
    event_loop: asyncio.AbstractEventLoop

    # paho's own factory of the connection's socket (2.x, called by connect());
    # overriding it is the one place to wrap the socket every write goes through.
    def _create_socket(self) -> Any:
        return FaultySocket(super()._create_socket(), self.fault, self.event_loop)


class MqttDevice(SimulatedDevice[bytes]):
    """A device on the hub's MQTT broker; `await device.run()` runs its whole life cycle.

    It connects to `options.host:options.port` and publishes at `options.qos`
    under `options.topic_root`; the other arguments are `SimulatedDevice`'s.
    """

    transport = "mqtt"

    def __init__(
        self,
        device_id: str,
        credential: str,
        options: FleetOptions,
        *,
        stats: FleetStats | None = None,
        stop: asyncio.Event | None = None,
        connect_limiter: ConnectLimiter | None = None,
        on_acknowledged: AckHook | None = None,
    ) -> None:
        super().__init__(
            device_id,
            credential,
            options,
            stats=stats,
            stop=stop,
            connect_limiter=connect_limiter,
            on_acknowledged=on_acknowledged,
        )
        self.host = options.host
        self.port = options.port
        self.qos = options.qos
        # paho's keepalive is whole seconds.
        self.keepalive_s = max(1, math.ceil(options.keepalive_s))
        self.fault = options.fault
        self.topic_root = options.topic_root
        #: With `options.tls`: MQTT over TLS (`mqtt_tls_port`), one context per fleet.
        self.ssl_context = (
            client_ssl_context(options.tls_ca_file, options.tls_cert_file, options.tls_key_file)
            if options.tls
            else None
        )
        self.telemetry_topic = data_topic(options.topic_root, device_id, Kind.TELEMETRY)
        self.command_topic = command_topic(options.topic_root, device_id)
        # Command results awaiting their PUBACK: command id -> (topic, payload).
        self._results: dict[str, tuple[str, bytes]] = {}
        self._link: _Link | None = None

    # -- SimulatedDevice ---------------------------------------------------

    @classmethod
    def summary_qos(cls, options: FleetOptions) -> int | None:
        return options.qos

    def _make_message(self, seq: int, values: dict[str, float]) -> bytes:
        return telemetry_payload(seq, self.boot_id, values)

    async def _transmit(self, seq: int, message: bytes) -> None:
        if self._link is not None and not self._link.closed:
            self._link.publish(self.telemetry_topic, message, self.qos, ("t", seq))

    def _connection_lost(self) -> bool:
        return self._link is None or self._link.closed

    async def _connection(self) -> ConnectionEnd:
        loop = asyncio.get_running_loop()
        link = _Link(self, loop)
        self._link = link
        end = ConnectionEnd.RETRY
        try:
            await loop.run_in_executor(None, link.connect, self.host, self.port, self.keepalive_s)
        except (OSError, ValueError) as exc:
            link.failure = f"connect to {self.host}:{self.port} failed: {exc}"
            link.force_close()
            self._link = None
            self._note_error(link.failure)
            return end
        misc = asyncio.create_task(link.misc_loop())
        try:
            answered = await self._wait_for(
                lambda: link.subscribed or link.refusal is not None or link.closed,
                self.connect_timeout_s,
            )
            if link.refusal is not None:
                end = self._on_connect_refused(link.refusal)
                return end
            if not link.subscribed:
                link.failure = link.failure or (
                    "connection closed before CONNACK"
                    if answered
                    else f"no CONNACK within {self.connect_timeout_s:g} s"
                )
                return end
            self._on_accepted()
            for seq, message in self._resend_list():
                link.publish(self.telemetry_topic, message, self.qos, ("t", seq))
            for command_id, (topic, payload) in list(self._results.items()):
                link.publish(topic, payload, 1, ("r", command_id))
            end = await self._pump()
            return end
        finally:
            misc.cancel()
            await link.close()
            self._link = None
            self._on_closed()
            # A refused CONNACK was counted as refused, not as an error.
            if end is ConnectionEnd.RETRY and link.refusal is None:
                self._connection_failed(link.failure)

    # -- internals ---------------------------------------------------------

    def _on_connect_refused(self, reason: ReasonCode) -> ConnectionEnd:
        name = str(reason)
        self._refused(name)
        if reason.value in PERMANENT_CONNACK_CODES:
            self.refused_reason = name
            return ConnectionEnd.REFUSED
        return ConnectionEnd.RETRY

    def _published(self, sent: _Sent) -> None:
        kind, key = sent
        if kind == "t":
            assert isinstance(key, int)
            self._acknowledge(key)
        else:
            assert isinstance(key, str)
            self._results.pop(key, None)

    def _command(self, raw: bytes | bytearray) -> None:
        try:
            command = json.loads(raw)
        except ValueError:
            command = None
        raw_id = command.get("id") if isinstance(command, dict) else None
        try:
            command_id = validate_command_id(raw_id)
        except EnvelopeError:
            # Without a usable id there is no topic to answer on.
            log.warning("%s: ignored a command without a usable id: %r", self.device_id, raw[:200])
            return
        assert isinstance(command, dict)
        name = command.get("name")
        if not isinstance(name, str) or not name:
            self.stats.commands_answered += 1
            self._send_result(command_id, {"ok": False, "error": "command name must be a string"})
            return
        outcome = self._answer_command(name, command.get("args", {}))
        self._send_result(command_id, outcome.to_json_object())

    def _send_result(self, command_id: str, body: dict[str, Any]) -> None:
        topic = command_result_topic(self.topic_root, self.device_id, command_id)
        try:
            payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            payload = json.dumps({"ok": False, "error": f"result not JSON: {exc}"}).encode()
        self._results[command_id] = (topic, payload)
        if self._link is not None and not self._link.closed:
            self._link.publish(topic, payload, 1, ("r", command_id))
