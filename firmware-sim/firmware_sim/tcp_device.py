"""A simulated device speaking a hub TCP protocol (native or lines), like real firmware.

Layer: firmware simulator; imports the hub core (the codecs, `hub.protocol.*`
and `hub.errors`) only, never bridges or tasks.

Per connection: one codec instance in the device role, a HELLO with the
device id, credential and boot id, then TELEMETRY frames with seq counting up
from 1, at most `window` of them unacknowledged. The hub answers each with ACK
or NAK. PINGs are answered with PONG; the device PINGs after `keepalive_s` of
silence so the hub's idle timeout does not drop it; COMMANDs are answered with
COMMAND_RESULT (see `firmware_sim.commands`). On a lost connection everything
unacknowledged is resent with the same seq and boot id (see
`firmware_sim.device` for the life cycle). With a fault in the options, every
write goes through `firmware_sim.outbox.Outbox`. With `tls` in the options it
connects over TLS (one client context per fleet, checking the hub's name).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

from firmware_sim.device import AckHook, ConnectionEnd, SimulatedDevice
from firmware_sim.options import FleetOptions, client_ssl_context
from firmware_sim.outbox import Outbox
from firmware_sim.pacing import ConnectLimiter
from firmware_sim.summary import FleetStats
from hub.errors import RemoteProtocolError
from hub.protocol.base import Codec, CodecFactory
from hub.protocol.discovery import load_codec
from hub.protocol.events import (
    Ack,
    Command,
    CommandResult,
    ConnectionClosed,
    Event,
    Hello,
    Nak,
    NakReason,
    NeedData,
    Ping,
    Pong,
    Role,
    Telemetry,
)

__all__ = ["PERMANENT_REFUSALS", "TcpDevice"]

#: HELLO refusals after which retrying cannot help; any other NAK is retried.
PERMANENT_REFUSALS = frozenset({NakReason.UNKNOWN_DEVICE, NakReason.BAD_CREDENTIAL})

_READ_CHUNK = 65536


@functools.cache
def _codec(name: str) -> CodecFactory:
    # Looking codecs up scans the installed packages' entry points: once per
    # name, not once per device of a fleet of thousands.
    return load_codec(name)


class _Link:
    """One TCP connection: its streams, its codec and what happened on it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: Codec,
        outbox: Outbox | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec
        #: Set when the fleet injects a fault: writes then pass through it.
        self.outbox = outbox
        self.accepted = False
        self.refusal: NakReason | None = None
        self.closed = False
        #: Why the link failed, when it did; counted as one error per connection.
        self.failure: str | None = None
        self.last_tx = asyncio.get_running_loop().time()

    def send(self, event: Event) -> bool:
        """Encode and write `event`; False if the connection is already gone."""
        if self.closed or self.writer.is_closing():
            return False
        data = self.codec.send(event)
        if self.outbox is None:
            self.writer.write(data)
        else:
            self.outbox.send(data)
        self.last_tx = asyncio.get_running_loop().time()
        return True


class TcpDevice(SimulatedDevice[Telemetry]):
    """A device on a hub TCP listener; `await device.run()` runs its whole life cycle.

    It connects to `options.host:options.port` and speaks `options.codec`;
    the other arguments are `SimulatedDevice`'s.
    """

    transport = "tcp"

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
        self.codec_name = options.codec
        self._codec_factory = _codec(options.codec)
        self.keepalive_s = options.keepalive_s
        self.max_frame_bytes = options.max_frame_bytes
        # Command results awaiting their ACK, resent on reconnect like telemetry.
        self._results: dict[int, CommandResult] = {}
        self._ping_seq = 0
        self._link: _Link | None = None
        self._ssl_context = (
            client_ssl_context(options.tls_ca_file, options.tls_cert_file, options.tls_key_file)
            if options.tls
            else None
        )

    # -- SimulatedDevice ---------------------------------------------------

    def _make_message(self, seq: int, values: dict[str, float]) -> Telemetry:
        return Telemetry(seq=seq, payload=values, device_time_ms=int(time.time() * 1000))

    async def _transmit(self, seq: int, message: Telemetry) -> None:
        link = self._link
        if link is not None and link.send(message):
            # Waits only while the socket buffer is full: backpressure from the hub.
            await link.writer.drain()

    def _connection_lost(self) -> bool:
        return self._link is None or self._link.closed

    async def _connection(self) -> ConnectionEnd:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl_context
                )
        except (OSError, TimeoutError) as exc:
            self._note_error(f"connect to {self.host}:{self.port} failed: {str(exc) or 'timeout'}")
            return ConnectionEnd.RETRY
        codec = self._codec_factory(Role.DEVICE, max_frame_bytes=self.max_frame_bytes)
        fault = self.options.fault
        outbox = None if fault is None else Outbox(writer.write, fault, asyncio.get_running_loop())
        link = _Link(reader, writer, codec, outbox)
        self._link = link
        reader_task = asyncio.create_task(self._read_loop(link))
        keepalive_task: asyncio.Task[None] | None = None
        end = ConnectionEnd.RETRY
        try:
            link.send(Hello(self.device_id, self.credential, self.boot_id))
            answered = await self._wait_for(
                lambda: link.accepted or link.refusal is not None or link.closed,
                self.connect_timeout_s,
            )
            if link.refusal is not None:
                end = self._on_hello_refused(link.refusal)
                return end
            if not link.accepted:
                link.failure = link.failure or (
                    "connection closed before the HELLO was answered"
                    if answered
                    else f"no answer to HELLO within {self.connect_timeout_s:g} s"
                )
                return end
            self._on_accepted()
            keepalive_task = asyncio.create_task(self._keepalive(link))
            for _seq, message in self._resend_list():
                link.send(message)
            for result in self._results.values():
                link.send(result)
            await writer.drain()
            end = await self._pump()
            return end
        except (ConnectionError, OSError) as exc:
            link.failure = link.failure or f"connection lost: {exc}"
            end = ConnectionEnd.RETRY
            return end
        finally:
            link.closed = True
            if link.outbox is not None:
                link.outbox.close()
            if keepalive_task is not None:
                keepalive_task.cancel()
            reader_task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            self._link = None
            self._on_closed()
            # A refused HELLO was counted as refused, not as an error.
            if end is ConnectionEnd.RETRY and link.refusal is None:
                self._connection_failed(link.failure)

    # -- internals ---------------------------------------------------------

    def _on_hello_refused(self, reason: NakReason) -> ConnectionEnd:
        self._refused(reason.name)
        if reason in PERMANENT_REFUSALS:
            self.refused_reason = reason.name
            return ConnectionEnd.REFUSED
        # Overloaded, internal error...: worth another try after a backoff.
        return ConnectionEnd.RETRY

    async def _read_loop(self, link: _Link) -> None:
        try:
            while True:
                data = await link.reader.read(_READ_CHUNK)
                link.codec.receive_data(data)
                while True:
                    event = link.codec.next_event()
                    if isinstance(event, NeedData | ConnectionClosed):
                        break
                    self._handle(link, event)
                if not data:
                    link.failure = link.failure or "connection closed by the hub"
                    return
        except RemoteProtocolError as exc:
            link.failure = f"protocol error from the hub: {exc}"
        except (ConnectionError, OSError) as exc:
            link.failure = f"connection lost: {exc}"
        finally:
            link.closed = True
            self._wake.set()

    def _handle(self, link: _Link, event: Event) -> None:
        match event:
            case Ack(seq=seq):
                if not link.accepted:
                    link.accepted = True
                    self._wake.set()
                elif not self._acknowledge(seq):
                    self._results.pop(seq, None)
            case Nak(seq=seq, reason=reason):
                if not link.accepted:
                    link.refusal = reason
                    self._wake.set()
                elif seq in self._results:
                    self._results.pop(seq)
                    self._refused(reason.name)
                else:
                    self._refuse_message(seq, reason.name)
            case Ping(seq=seq):
                link.send(Pong(seq))
            case Pong():
                pass
            case Command(command_id=command_id, name=name, args=args):
                if link.accepted:
                    outcome = self._answer_command(name, args)
                    result = CommandResult(
                        self._next_seq(), command_id, outcome.ok, outcome.result, outcome.error
                    )
                    self._results[result.seq] = result
                    link.send(result)
            case _:
                pass

    async def _keepalive(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        while not link.closed:
            idle = loop.time() - link.last_tx
            if idle >= self.keepalive_s:
                self._ping_seq += 1
                link.send(Ping(self._ping_seq))
                idle = 0.0
            await asyncio.sleep(self.keepalive_s - idle)
