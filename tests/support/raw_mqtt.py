"""A blocking, hand-driven MQTT 3.1.1 device on a plain socket, for exact payloads.

No client library in between: what the test writes is what the broker gets,
and each QoS 1 publish waits for its own PUBACK.
"""

from __future__ import annotations

import contextlib
import socket
import struct


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One whole MQTT packet from `sock`: its first byte and its body."""
    first = _recv_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _recv_exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, _recv_exactly(sock, length)


class RawMqttDevice:
    """Connects as `device_id` (username and client id) with its credential."""

    def __init__(self, port: int, device_id: str, credential: str, *, timeout: float = 30) -> None:
        self.device_id = device_id
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        connect = (
            _utf8("MQTT")
            + bytes([4, 0xC2])  # level 4; username, password, clean session
            + struct.pack(">H", 30)
            + _utf8(device_id)
            + _utf8(device_id)
            + _utf8(credential)
        )
        self.sock.sendall(_packet(0x10, connect))
        kind, body = self.read_packet()
        if kind != 0x20 or body[1] != 0:
            raise ConnectionError(f"CONNACK refused: {body!r}")
        self._packet_id = 0

    def read_packet(self) -> tuple[int, bytes]:
        return read_packet(self.sock)

    def publish_qos1(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for its PUBACK."""
        self._packet_id = self._packet_id % 65535 + 1
        packet_id = self._packet_id
        self.sock.sendall(_packet(0x32, _utf8(topic) + struct.pack(">H", packet_id) + payload))
        kind, body = self.read_packet()
        if kind != 0x40 or struct.unpack(">H", body)[0] != packet_id:
            raise ConnectionError(f"expected PUBACK {packet_id}, got {kind:#x} {body!r}")

    def publish_qos0(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 0: nothing comes back; blocks while the broker does not read."""
        self.sock.sendall(_packet(0x30, _utf8(topic) + payload))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(_packet(0xE0, b""))
        self.sock.close()
