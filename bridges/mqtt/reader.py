"""The reader amqtt reads a client connection through: whole, checked packets only.

Layer: bridges; imports the `hub` core (`hub.mqtt_rules`), `bridges.mqtt.lean`,
`bridges.backpressure` and amqtt's reader adapter base class only.

amqtt 0.12.1 parses what a client sends loosely: it accepts many packets the
MQTT 3.1.1 specification calls malformed (where the server MUST close the
network connection, [MQTT-4.8.0-1]), hangs on some, and never closes a
connection whose first packet is bad. `PacketReader` reads every packet
whole and checks it (`hub.mqtt_rules.check_packet`) *before* amqtt sees a
byte of it. It refuses a first packet that is not a CONNECT from its first
byte, and a CONNECT that names no MQTT protocol from its first body bytes, so
random bytes never hold a connection; it enforces the packet size limit from
the length field (before the body is buffered), the topic level limit, the
CONNECT timeout, the keep-alive (1.5 times the client's keep-alive with no
packet, [MQTT-3.1.2-24]) and backpressure between packets. A violation is
counted and logged once, and from then on the reader reports end of stream,
which makes amqtt end the connection the way it does for a lost client (so
the will is published, [MQTT-3.1.2-8]).

A PUBLISH the fast path takes (`fast_publish`, set by bridges.mqtt.tap once
a device's session runs; docs/mqtt.md, "The fast path") is never handed to
amqtt: the reader goes on to the next packet. The CONNECT timeout and the
keep-alive are one watchdog timer per connection (not a timeout per read),
which cancels the read waiting when the deadline it finds has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from amqtt.adapters import ReaderAdapter

from bridges.backpressure import Room
from bridges.mqtt.lean import LeanEvent
from hub.mqtt_rules import (
    CONNECT_BYTE,
    CONNECT_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    PROTOCOL_NAMES,
    PROTOCOL_VIOLATION,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    ConnectInfo,
    PacketTooLarge,
    ProtocolViolation,
    check_packet,
)

#: Asks the connection's protocol state whether an acknowledgement fits its
#: flow: (packet type, packet identifier) -> None, or why it does not.
AckCheck = Callable[[int, int], "str | None"]
#: The fast path of device uplink (bridges.mqtt.tap, docs/mqtt.md "The fast
#: path"): (fixed-header flags, body) of a checked PUBLISH -> True when it took
#: the packet (amqtt never sees it), False to hand it to amqtt as usual.
FastPublish = Callable[[int, bytes], bool]
#: Packets the fast path takes in a row before the reader yields to the loop.
_FAST_TURN = 32


class ByteStream(Protocol):
    """What the reader reads a connection from: an `asyncio.StreamReader` (TCP,
    TLS) or a `bridges.mqtt.websocket.WebSocketStream` (the payload of binary frames)."""

    async def readexactly(self, n: int) -> bytes: ...

    def feed_eof(self) -> None: ...


class PacketReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's view of a client connection: whole, checked packets only.

    amqtt reads a packet a few bytes at a time; each packet is read whole,
    checked, and then handed out from a buffer. amqtt's own keep-alive read
    timeout must be off (the broker gives amqtt a keep-alive of 0): it would
    cancel a read midway, and this reader enforces the keep-alive itself.
    """

    def __init__(
        self,
        inner: ByteStream,
        *,
        max_packet_bytes: int,
        connect_timeout_s: float,
        peer: str,
        max_topic_levels: int | None = None,
        reply: Callable[[bytes], None],
        on_violation: Callable[[ProtocolViolation, str], None],
        room: Room | None = None,
    ) -> None:
        self._inner = inner
        #: The dispatcher's room (bridges.backpressure): while it is full, no
        #: packet after the CONNECT is read.
        self._room = room
        self._max = max_packet_bytes
        self._max_topic_levels = max_topic_levels
        self._connect_timeout_s = connect_timeout_s
        self._reply = reply
        self._on_violation = on_violation
        self.peer = peer
        self.packets = 0
        self.connect: ConnectInfo | None = None
        #: Set by the protocol handler once attached (see `AckCheck`).
        self.check_ack: AckCheck | None = None
        #: Set by the protocol handler once its device's session runs.
        self.fast_publish: FastPublish | None = None
        self.failed: str | None = None
        self._buffer = bytearray()
        self._last_packet = asyncio.get_running_loop().time()
        self._watchdog: asyncio.TimerHandle | None = None
        # The task waiting in `_receive`, and why the watchdog cancelled it.
        self._reading: asyncio.Task[object] | None = None
        self._task: asyncio.Task[object] | None = None
        self._silent: ProtocolViolation | None = None
        self._resume: asyncio.Event = LeanEvent()
        self._resume.set()

    # -- backpressure (bridges.mqtt.tap) --------------------------------------

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    # -- ReaderAdapter ---------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        if n == 0:
            # amqtt reads a zero-length field (an empty will message or
            # password) as read(0): with the packet's bytes all handed out, that
            # must not wait for the next packet [MQTT-3.1.4-4].
            return b""
        if not self._buffer and self.failed is None:
            self._buffer += await self._read_packet()
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    async def prefetch(self) -> None:
        """Read the first packet (the CONNECT) ahead of amqtt, within the
        CONNECT timeout, and keep it for amqtt's reads: the listener waits for
        it before the connection takes a place among the handshakes, so a
        silent socket holds none."""
        if not self._buffer and self.failed is None:
            self._buffer += await self._read_packet()

    # -- one packet --------------------------------------------------------------------

    async def _read_packet(self) -> bytes:
        """The next complete, checked packet for amqtt; b"" (end of stream) once
        the client closed or broke the protocol. Packets the fast path takes
        (`fast_publish`) are read here one after the other, never handed out."""
        # Let the handler's task for the packet just handed out run first: it
        # may pause this connection (backpressure) before the next is read,
        # and takes its place among the connection's PUBACKs (bridges.mqtt.acks).
        await asyncio.sleep(0)
        taken = 0
        loop = asyncio.get_running_loop()
        room = self._room
        while True:
            if self.paused:
                await self._resume.wait()
                # Not reading was our own doing; the client's silence counts from now.
                self._last_packet = loop.time()
            if room is not None and room.full and self.connect is not None:
                await room.wait()
                self._last_packet = loop.time()
            self._watch()
            task = self._task
            if task is None:
                # amqtt reads the CONNECT in the connection's task, and every
                # later packet in its handler's reader task: looked up once each.
                task = self._task = asyncio.current_task()
            self._reading = task
            try:
                packet = await self._receive()
            except ProtocolViolation as exc:
                self._fail(exc)
                return b""
            except (asyncio.IncompleteReadError, ConnectionError):
                self._unwatch()
                return b""  # the client went away, possibly mid-packet
            except asyncio.CancelledError:
                silent, self._silent = self._silent, None
                if silent is not None and task is not None and task.uncancel() == 0:
                    self._fail(silent)  # the watchdog's cancel, and only that
                    return b""
                self._unwatch()  # the connection is being closed by the hub
                raise
            finally:
                self._reading = None
            # Every packet is activity, those of the fast path too [MQTT-3.1.2-24].
            self._last_packet = loop.time()
            self.packets += 1
            if packet is not None:
                return packet
            taken += 1
            if taken % _FAST_TURN == 0:
                # Buffered packets are read without a suspension: let the
                # other connections (and the dispatcher's flush) have a turn.
                await asyncio.sleep(0)

    # -- the CONNECT timeout and the keep-alive ----------------------------------------

    def _watch(self) -> None:
        """Arm the watchdog for the packet being read. One timer per
        connection, moved only when it fires (a timeout per read cost a timer
        per packet): it compares the deadline then with the last packet's time."""
        if self._watchdog is None and self.failed is None:
            deadline = self._deadline()
            if deadline is not None:
                self._watchdog = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _expire(self) -> None:
        self._watchdog = None
        if self.paused or self.failed is not None or self._reading is None:
            # Not reading (backpressure, or amqtt handling the last packet):
            # the next read arms the watchdog again and finds the deadline.
            return
        deadline = self._deadline()
        if deadline is None:
            return  # keep-alive 0 [MQTT-3.1.2-10]
        if asyncio.get_running_loop().time() < deadline:
            self._watch()  # packets came since: the deadline moved on
            return
        if self.connect is None:
            violation = ProtocolViolation(
                f"no CONNECT within {self._connect_timeout_s:.1f} s (mqtt_connect_timeout_s)",
                reason=CONNECT_TIMEOUT,
            )
        else:
            violation = ProtocolViolation(
                f"silent for 1.5 times its keep-alive of {self.connect.keep_alive_s} s",
                reason=KEEPALIVE_TIMEOUT,
            )
        # Ends the read waiting in `_receive`, as `asyncio.timeout` would.
        self._silent = violation
        self._reading.cancel()

    def stop_watching(self) -> None:
        """The connection ended: no timeout may fire for it any more."""
        self._unwatch()
        self.failed = self.failed or "closed"

    def _deadline(self) -> float | None:
        """When the packet being read must be complete (event loop time)."""
        if self.connect is None:
            return self._last_packet + self._connect_timeout_s
        if self.connect.keep_alive_s == 0:
            return None  # keep-alive off [MQTT-3.1.2-10]
        # [MQTT-3.1.2-24]: disconnect after one and a half keep-alive periods.
        return self._last_packet + 1.5 * self.connect.keep_alive_s

    async def _receive(self) -> bytes | None:
        """One packet, whole and checked; None when the fast path took it."""
        header = await self._inner.readexactly(1)
        if not header:
            raise asyncio.IncompleteReadError(b"", 1)
        if self.connect is None and header[0] != CONNECT_BYTE:
            # [MQTT-3.1.0-1]: refused from its first byte, before any length
            # it announces could keep the connection waiting for a body.
            raise ProtocolViolation(
                f"first packet starts with {header[0]:#04x}, not CONNECT ({CONNECT_BYTE:#04x})"
            )
        length_bytes = bytearray()
        length, multiplier = 0, 1
        while True:
            byte = (await self._inner.readexactly(1))[0]
            length_bytes.append(byte)
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                break
            multiplier *= 128
            if len(length_bytes) == 4:
                raise ProtocolViolation("remaining length longer than four bytes")
        if length > self._max:
            # Refused from the length field: the body is never buffered.
            raise PacketTooLarge(
                f"MQTT packet of {length} bytes exceeds mqtt_max_packet_bytes ({self._max})"
            )
        if self.connect is None:
            body = await self._connect_body(length)
        else:
            body = await self._inner.readexactly(length) if length else b""
        packet_type, flags = header[0] >> 4, header[0] & 0x0F
        info = check_packet(
            packet_type,
            flags,
            body,
            first=self.connect is None,
            max_topic_levels=self._max_topic_levels,
        )
        if info is not None:
            self.connect = info
            self._unwatch()  # from now on the keep-alive's deadline, not the CONNECT's
            self._task = None  # and another task reads (see `_read_packet`)
        elif packet_type in (PUBACK, PUBREC, PUBCOMP) and self.check_ack is not None:
            problem = self.check_ack(packet_type, int.from_bytes(body[:2], "big"))
            if problem is not None:
                raise ProtocolViolation(problem, reason=PROTOCOL_VIOLATION)
        elif (
            packet_type == PUBLISH
            and self.fast_publish is not None
            and self.fast_publish(flags, body)
        ):
            return None  # taken by the fast path: amqtt never sees it
        return bytes(header) + bytes(length_bytes) + body

    async def _connect_body(self, length: int) -> bytes:
        """A CONNECT's body, refused as soon as its first bytes name no MQTT
        protocol: random bytes that begin with 0x10 and announce a long packet
        must not hold the connection until the body or the timeout comes."""
        shortest = min(len(name) for name in PROTOCOL_NAMES)
        head = await self._inner.readexactly(min(length, shortest))
        if not any(name.startswith(head) for name in PROTOCOL_NAMES):
            raise ProtocolViolation("CONNECT: the protocol name is not MQTT")  # [MQTT-3.1.2-1]
        rest = await self._inner.readexactly(length - len(head)) if length > len(head) else b""
        return head + rest

    def _fail(self, violation: ProtocolViolation) -> None:
        self._unwatch()
        self.failed = violation.reason
        if violation.connack is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):  # the client is gone
                self._reply(bytes([0x20, 0x02, 0x00, violation.connack]))
        self._on_violation(violation, self.peer)
