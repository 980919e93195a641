"""The TCP baseline: the plain asyncio server a user would write by hand around `task.delay()`.

Layer: benchmarks; may import anything.

`python -m bench.baseline_tcp --port 0 --credentials hashes.json` serves the
hub's native protocol (the same sans-IO codec, in the hub role) to the same
simulated devices: a HELLO is checked against the devices' credential hashes,
and every TELEMETRY frame becomes one `store_reading.delay(...)` call,
followed by the device's ACK once `delay()` has returned (with publisher
confirms on, that is once RabbitMQ holds the message). There is no batching,
no spool and no thread: `delay()` runs on the event loop, as in the naive
version of the pipeline. It prints `listening on 127.0.0.1:<port>` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from bench.baseline_tasks import store_reading
from hub.errors import RemoteProtocolError
from hub.protocol.discovery import load_codec
from hub.protocol.events import (
    NEED_DATA,
    Ack,
    ConnectionClosed,
    Hello,
    Nak,
    NakReason,
    Ping,
    Pong,
    Role,
    Telemetry,
)


class BaselineConnection(asyncio.Protocol):
    """One device connection: decode, `delay()` each message, ACK."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = hashes
        self._codec = load_codec("native")(Role.HUB)
        self._transport: asyncio.Transport | None = None
        self._device_id: str | None = None
        self._boot_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._codec.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self._codec.receive_data(b"")
        self._process()
        return None

    def _process(self) -> None:
        while self._transport is not None and not self._transport.is_closing():
            try:
                event = self._codec.next_event()
            except RemoteProtocolError as exc:
                self._send(Nak(exc.seq, NakReason(exc.code), str(exc)[:200]))
                self._transport.close()
                return
            if event is NEED_DATA:
                return
            self._handle(event)

    def _handle(self, event: Any) -> None:
        if isinstance(event, Telemetry):
            assert self._device_id is not None  # the codec refuses data before HELLO
            store_reading.delay(
                self._device_id,
                self._boot_id,
                event.seq,
                (
                    datetime.fromtimestamp(event.device_time_ms / 1000, UTC).isoformat()
                    if event.device_time_ms
                    else None
                ),
                datetime.now(UTC).isoformat(),
                dict(event.payload),
            )
            self._send(Ack(event.seq))
        elif isinstance(event, Hello):
            stored = self._hashes.get(event.device_id)
            offered = hashlib.sha256(event.credential.encode()).hexdigest()
            if stored is None or not hmac.compare_digest(stored, offered):
                self._send(Nak(event.seq, NakReason.BAD_CREDENTIAL, "refused"))
                assert self._transport is not None
                self._transport.close()
                return
            self._device_id = event.device_id
            self._boot_id = event.boot_id
            self._send(Ack(event.seq))
        elif isinstance(event, Ping):
            self._send(Pong(event.seq))
        elif isinstance(event, ConnectionClosed) and self._transport is not None:
            self._transport.close()

    def _send(self, event: Any) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._codec.send(event))


async def serve(host: str, port: int, hashes: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: BaselineConnection(hashes), host, port, reuse_address=True, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline_tcp",
        description="The hand-written TCP baseline: one task.delay() per device message.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--credentials", required=True, help="JSON file: device id -> SHA-256 of its credential"
    )
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    args = parser.parse_args(argv)
    hashes = json.loads(Path(args.credentials).read_text("utf-8"))
    if args.loop != "asyncio":
        # auto: uvloop where installed, as the hub's own event_loop = auto.
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(serve(args.host, args.port, hashes))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
