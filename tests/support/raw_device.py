"""A blocking, hand-driven device for tests that need exact bytes on the wire.

It uses the real codec in the device role; `send_raw` puts arbitrary bytes on
the socket to inject malformed frames.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from hub.protocol.discovery import load_codec
from hub.protocol.events import NEED_DATA, Ack, ConnectionClosed, Hello, Nak, Role, Telemetry


class RawDevice:
    def __init__(
        self,
        port: int,
        *,
        codec: str = "native",
        timeout: float = 10,
        source_address: str | None = None,
    ) -> None:
        # `source_address`: another loopback address (127.0.0.2) to connect from.
        source = None if source_address is None else (source_address, 0)
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=source
        )
        self.codec = load_codec(codec)(Role.DEVICE)
        self.events: list[Any] = []
        self.closed = False

    def send(self, event: Any) -> None:
        self.sock.sendall(self.codec.send(event))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, device_id: str, credential: str, boot_id: int = 1) -> Any:
        self.send(Hello(device_id=device_id, credential=credential, boot_id=boot_id))
        return self.next_event()

    def telemetry(self, seq: int, payload: dict[str, Any]) -> None:
        self.send(Telemetry(seq=seq, payload=payload))

    def next_event(self, timeout: float = 10) -> Any:
        """The next event from the hub; ConnectionClosed once the hub closed the socket."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.codec.next_event()
            if event is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    self.closed = True
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event from the hub")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.codec.receive_data(data)

    def acks_until(self, last_seq: int, timeout: float = 30) -> set[int]:
        """Read ACKs until `last_seq` is acknowledged; returns every acknowledged seq."""
        acked: set[int] = set()
        while last_seq not in acked:
            event = self.next_event(timeout)
            if isinstance(event, Ack):
                acked.add(event.seq)
            elif isinstance(event, (Nak, ConnectionClosed)):
                raise AssertionError(f"unexpected {event!r} while waiting for acks")
        return acked

    def close(self) -> None:
        self.sock.close()
