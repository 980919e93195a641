"""A lean MQTT 3.1.1 publisher for load runs: raw asyncio streams, no paho.

Layer: firmware simulator; imports the hub core only (`hub.topics`, the one
definition of the topic scheme) and the simulator's device, options and
summary modules, never bridges or tasks.

`LeanMqttDevice` is the `mqtt-lean` transport of `firmware_sim.fleet`
(`firmware-sim mqtt --lean`, and what `python -m bench ingest --transport
mqtt` drives by default). It follows the same life cycle as every simulated
device (`firmware_sim.device`: window, pacing, reconnect, resend) and sends
the same telemetry as `firmware_sim.mqtt_device.MqttDevice` on the same
topic, but builds the packets itself, so that the load generator costs a
few tens of microseconds per message rather than paho's per-message
bookkeeping, and writes what a device sends in one loop iteration in one
system call:

    CONNECT  10 <len> 00 04 "MQTT" 04 <flags: user, password, clean> <keepalive>
             <client id> <user name> <password>
    CONNACK  20 02 <session present> <return code>
    PUBLISH  3q <len> <topic length> <topic> [<packet id>] <payload>   (q = QoS << 1)
    PUBACK   40 02 <packet id>
    PINGREQ  c0 00       PINGRESP d0 00       DISCONNECT e0 00

At QoS 1 each PUBLISH carries a packet id (1..65535, skipping ids still in
flight) and the message counts as acknowledged on its PUBACK; at most
`window` are in flight per device. At QoS 0 a message counts as acknowledged
once written. With `FleetOptions.subscribe` it also sends, right after the
CONNACK, one SUBSCRIBE to its command topic at QoS 1 and counts as online
only once the SUBACK grants it (what a fleet of idle command-ready devices
costs the hub; the connections benchmark):

    SUBSCRIBE 82 <len> <packet id> <topic filter> 01      SUBACK 90 03 <packet id> <code>

What it does not do: it answers no commands (a command PUBLISH is read and
ignored), keeps no session (clean session on every connect) and only reads
CONNACK, SUBACK, PUBACK, PINGRESP and, ignored, anything else the broker sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from firmware_sim.device import AckHook, ConnectionEnd, SimulatedDevice
from firmware_sim.mqtt_device import PERMANENT_CONNACK_CODES, telemetry_payload
from firmware_sim.options import FleetOptions, client_ssl_context
from firmware_sim.pacing import ConnectLimiter
from firmware_sim.summary import FleetStats
from hub.envelope import Kind
from hub.topics import command_topic, data_topic

__all__ = [
    "CONNACK_REASONS",
    "LeanMqttDevice",
    "PacketReader",
    "connect_packet",
    "publish_packet",
    "subscribe_packet",
]

log = logging.getLogger("firmware_sim.lean_mqtt")

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
#: MQTT 3.1.1 CONNACK return codes (section 3.2.2.3), named as paho names their
#: MQTT 5 equivalents so that both MQTT devices count refusals alike.
CONNACK_REASONS = {
    1: ("Unsupported protocol version", 132),
    2: ("Client identifier not valid", 133),
    3: ("Server unavailable", 136),
    4: ("Bad user name or password", 134),
    5: ("Not authorized", 135),
}
_U16 = struct.Struct("!H")
_PINGREQ = bytes((PINGREQ << 4, 0))
_DISCONNECT = bytes((DISCONNECT << 4, 0))
_MAX_PACKET_ID = 0xFFFF


def _remaining_length(n: int) -> bytes:
    """The variable-length "remaining length" of a fixed header (section 2.2.3)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return _U16.pack(len(data)) + data


def connect_packet(client_id: str, user: str, password: str, keepalive_s: int) -> bytes:
    """CONNECT with user name, password and a clean session (MQTT 3.1.1)."""
    flags = 0x80 | 0x40 | 0x02
    body = (
        _string("MQTT")
        + bytes((4, flags))
        + _U16.pack(keepalive_s)
        + _string(client_id)
        + _string(user)
        + _string(password)
    )
    return bytes((CONNECT << 4,)) + _remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    """PUBLISH of `payload` on `topic` (already encoded: `_string(topic)`); no packet id
    at QoS 0."""
    ident = _U16.pack(packet_id) if qos else b""
    size = len(topic) + len(ident) + len(payload)
    return bytes((PUBLISH << 4 | qos << 1,)) + _remaining_length(size) + topic + ident + payload


def subscribe_packet(topic_filter: str, qos: int, packet_id: int) -> bytes:
    """SUBSCRIBE to one filter at `qos` (the fixed header's flags are 0010)."""
    body = _U16.pack(packet_id) + _string(topic_filter) + bytes((qos,))
    return bytes((SUBSCRIBE << 4 | 0x02,)) + _remaining_length(len(body)) + body


class PacketReader:
    """Splits the bytes a broker sends into (packet type, flags, body) triples."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Every whole packet `data` completes, in order; the rest waits for more."""
        buf = self._buffer
        buf += data
        packets = []
        at, end = 0, len(buf)
        while end - at >= 2:
            # Remaining length: one to four bytes, seven bits each, low first.
            size, shift, pos, whole = 0, 0, at + 1, False
            while pos < end:
                byte = buf[pos]
                pos += 1
                size |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    whole = True
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed remaining length from the broker")
            if not whole or pos + size > end:
                break
            packets.append((buf[at] >> 4, buf[at] & 0x0F, bytes(buf[pos : pos + size])))
            at = pos + size
        del buf[:at]
        return packets


class _Link:
    """One connection's streams and the packet ids in flight on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.in_flight: dict[int, int] = {}  # packet id -> telemetry seq
        self.next_id = 0
        self.last_write = 0.0
        # Packets of this loop iteration, written together by `flush` (one system
        # call for the burst a device sends when its window opens, not one each).
        self._out: list[bytes] = []

    def write(self, packet: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._out.append(packet)

    def flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            if not self.closed:
                self.writer.write(b"".join(out))

    def packet_id(self) -> int:
        """The next packet id not in flight (the window keeps far fewer than 65,535)."""
        while True:
            self.next_id = self.next_id % _MAX_PACKET_ID + 1
            if self.next_id not in self.in_flight:
                return self.next_id


class LeanMqttDevice(SimulatedDevice[bytes]):
    """A publishing-only MQTT device with hand-built packets (see the module doc)."""

    transport = "mqtt-lean"

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
        self.keepalive_s = max(1, min(int(options.keepalive_s), 0xFFFF))
        self.telemetry_topic = data_topic(options.topic_root, device_id, Kind.TELEMETRY)
        self._topic = _string(self.telemetry_topic)
        self.command_topic = (
            command_topic(options.topic_root, device_id) if options.subscribe else None
        )
        self._link: _Link | None = None
        #: With `options.tls`: MQTT over TLS (`mqtt_tls_port`), as the paho devices.
        self._ssl_context = (
            client_ssl_context(options.tls_ca_file, options.tls_cert_file, options.tls_key_file)
            if options.tls
            else None
        )

    @classmethod
    def summary_qos(cls, options: FleetOptions) -> int | None:
        return options.qos

    def _make_message(self, seq: int, values: dict[str, float]) -> bytes:
        return telemetry_payload(seq, self.boot_id, values)

    async def _transmit(self, seq: int, message: bytes) -> None:
        link = self._link
        if link is None or link.closed:
            return
        self._write(link, seq, message)

    def _write(self, link: _Link, seq: int, message: bytes) -> None:
        if self.qos:
            packet_id = link.packet_id()
            link.in_flight[packet_id] = seq
            link.write(publish_packet(self._topic, message, 1, packet_id))
        else:
            link.write(publish_packet(self._topic, message, 0, 0))
        link.last_write = self._now()
        if not self.qos:
            self._acknowledge(seq)

    def _connection_lost(self) -> bool:
        return self._link is None or self._link.closed

    async def _connection(self) -> ConnectionEnd:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl_context
                )
        except (OSError, TimeoutError) as exc:
            self._note_error(f"connect to {self.host}:{self.port} failed: {exc!r}")
            return ConnectionEnd.RETRY
        link = _Link(reader, writer)
        packets = PacketReader()
        failure: str | None = None
        refused = False
        end = ConnectionEnd.RETRY
        tasks: list[asyncio.Task[None]] = []
        try:
            writer.write(
                connect_packet(self.device_id, self.device_id, self.credential, self.keepalive_s)
            )
            code = await self._reply(link, packets, CONNACK, 2)
            if code is None:
                failure = f"no CONNACK within {self.connect_timeout_s:g} s"
                return end
            if code:
                refused = True
                reason, paho_code = CONNACK_REASONS.get(code, (f"CONNACK code {code}", 0))
                self._refused(reason)
                if paho_code in PERMANENT_CONNACK_CODES:
                    self.refused_reason = reason
                    end = ConnectionEnd.REFUSED
                return end
            if self.command_topic is not None:
                # Packet id 1: nothing is in flight before the device is online.
                writer.write(subscribe_packet(self.command_topic, 1, 1))
                granted = await self._reply(link, packets, SUBACK, 3)
                if granted is None or granted == 0x80:
                    failure = "no SUBACK" if granted is None else "SUBSCRIBE refused"
                    return end
            self._link = link
            link.last_write = self._now()
            self._on_accepted()
            tasks = [
                asyncio.create_task(self._read(link, packets)),
                asyncio.create_task(self._keepalive(link)),
            ]
            for seq, message in self._resend_list():
                self._write(link, seq, message)
            end = await self._pump()
            if end is ConnectionEnd.DONE and not link.closed:
                link.write(_DISCONNECT)
                link.flush()
            return end
        except (OSError, ValueError) as exc:
            failure = f"connection failed: {exc!r}"
            return end
        finally:
            link.flush()
            link.closed = True
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._link = None
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            self._on_closed()
            # A refused CONNACK was counted as refused, not as an error.
            if end is ConnectionEnd.RETRY and not refused:
                self._connection_failed(failure)

    async def _reply(
        self, link: _Link, packets: PacketReader, expected: int, size: int
    ) -> int | None:
        """The last byte (return code) of the next packet, which must be an
        `expected` of `size` bytes (CONNACK, SUBACK); None without one in time
        (connection closed)."""
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                while True:
                    data = await link.reader.read(4096)
                    if not data:
                        return None
                    found = packets.feed(data)
                    if found:
                        kind, _, body = found[0]
                        if kind != expected or len(body) != size:
                            raise ValueError(f"expected packet type {expected}, got {kind}")
                        # Anything after it is handled by the reader.
                        self._handle(link, found[1:])
                        return body[-1]
        except TimeoutError:
            return None

    async def _read(self, link: _Link, packets: PacketReader) -> None:
        try:
            while True:
                data = await link.reader.read(65536)
                if not data:
                    break
                self._handle(link, packets.feed(data))
        except (OSError, ValueError) as exc:
            log.info("%s: read failed: %r", self.device_id, exc)
        finally:
            link.closed = True
            self._wake.set()

    def _handle(self, link: _Link, found: list[tuple[int, int, bytes]]) -> None:
        for kind, _, body in found:
            if kind == PUBACK:
                seq = link.in_flight.pop(_U16.unpack_from(body)[0], None)
                if seq is not None:
                    self._acknowledge(seq)

    async def _keepalive(self, link: _Link) -> None:
        # The broker closes a connection silent for 1.5 x keepalive; a PINGREQ
        # when nothing was written for half of it keeps a slow device alive.
        half = self.keepalive_s / 2
        while not link.closed:
            await asyncio.sleep(max(half - (self._now() - link.last_write), 0.05))
            if self._now() - link.last_write >= half and not link.closed:
                link.write(_PINGREQ)
                link.last_write = self._now()
