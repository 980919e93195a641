"""The TCP bridge against peers that hold connections: the HELLO deadline, the
idle timeout, the connection limit, and the hub's own open file limit.

Real hub (in process), real RabbitMQ, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from hub.protocol.discovery import load_codec
from hub.protocol.events import Ack, ConnectionClosed, Hello, Ping, Pong, Role
from tests.support.processes import ROOT, HubThread, wait_until
from tests.support.raw_device import RawDevice

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]
Connect = Callable[[int], RawDevice]


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Whether the hub closes `sock` within `within_s` (bytes it sends are ignored)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


def test_a_slow_sender_is_closed_at_the_hello_deadline(
    running_hub: StartHub, sockets: list[socket.socket]
) -> None:
    hub = running_hub(hello_timeout_s=1.5)
    hello = load_codec("native")(Role.DEVICE).send(
        Hello(device_id="slow-sender", credential="x" * 40, boot_id=1)
    )
    sock = socket.create_connection(("127.0.0.1", hub.tcp_port), timeout=10)
    sockets.append(sock)
    started = time.monotonic()
    closed_after = None
    # One byte every 0.3 s: a whole HELLO would take over 20 s. Each byte
    # would have reset an inactivity timer; the deadline must not move.
    for byte in hello:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed_after = time.monotonic() - started
            break
        if closed_by_peer(sock, 0.3):
            closed_after = time.monotonic() - started
            break
    assert closed_after is not None, "the slow sender was never closed"
    assert closed_after < 1.5 + 5.0, f"closed only after {closed_after:.1f} s"
    assert hub.counter("hub_protocol_errors_total", transport="tcp", reason="hello_timeout") == 1


def test_a_silent_socket_is_closed_at_the_hello_deadline(
    running_hub: StartHub, sockets: list[socket.socket]
) -> None:
    hub = running_hub(hello_timeout_s=1.0)
    sock = socket.create_connection(("127.0.0.1", hub.tcp_port), timeout=10)
    sockets.append(sock)
    assert closed_by_peer(sock, 1.0 + 5.0)
    assert wait_until(lambda: hub.counter("hub_connections", transport="tcp") == 0, 10)


def test_an_accepted_device_is_not_closed_by_the_hello_deadline(
    running_hub: StartHub, provision: Provision, connect: Connect, device_prefix: str
) -> None:
    hub = running_hub(hello_timeout_s=1.0)
    ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    time.sleep(2.5)
    device.send(Ping(seq=5))
    assert device.next_event() == Pong(5)


def test_the_idle_timeout_closes_when_the_silence_reaches_it_not_at_a_sweep(
    running_hub: StartHub, provision: Provision, connect: Connect, device_prefix: str
) -> None:
    timeout_s = 6.0
    hub = running_hub(idle_timeout_s=timeout_s)
    ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    # Just past half the timeout: a check every half timeout (the old sweep)
    # sees 2.9 s of silence at 6 s and 5.9 s at 9 s, and closes only at 12 s,
    # almost 9 s after the last frame.
    time.sleep(timeout_s / 2 + 0.1)
    device.send(Ping(seq=1))
    last_frame = time.monotonic()
    assert device.next_event() == Pong(1)
    assert isinstance(device.next_event(timeout=30), ConnectionClosed)
    silent_for = time.monotonic() - last_frame
    assert silent_for > timeout_s - 0.2, f"closed after {silent_for:.1f} s of silence"
    assert silent_for < timeout_s + 1.9, f"closed only after {silent_for:.1f} s of silence"
    assert hub.counter("hub_protocol_errors_total", transport="tcp", reason="idle_timeout") == 1


def test_connections_beyond_the_limit_are_closed_at_once_and_counted(
    running_hub: StartHub,
    provision: Provision,
    connect: Connect,
    device_prefix: str,
    sockets: list[socket.socket],
) -> None:
    hub = running_hub(tcp_max_connections=3, hello_timeout_s=60)
    ((device_id, credential),) = provision([f"{device_prefix}1"]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    for _ in range(2):
        sockets.append(socket.create_connection(("127.0.0.1", hub.tcp_port), timeout=10))
    assert wait_until(lambda: hub.counter("hub_connections", transport="tcp") == 3, 10)

    for _ in range(5):
        extra = socket.create_connection(("127.0.0.1", hub.tcp_port), timeout=10)
        sockets.append(extra)
        assert closed_by_peer(extra, 3.0), "a connection beyond the limit stayed open"
    refused = hub.counter(
        "hub_connections_refused_total", transport="tcp", reason="connection_limit"
    )
    assert refused == 5
    assert hub.counter("hub_connections", transport="tcp") == 3
    # The device connected before keeps working, and a freed place is usable.
    device.send(Ping(seq=2))
    assert device.next_event() == Pong(2)
    sockets.pop(0).close()
    assert wait_until(lambda: hub.counter("hub_connections", transport="tcp") == 2, 10)
    again = connect(hub.tcp_port)
    assert again.hello(device_id, credential) == Ack(0)


def test_the_hub_raises_its_open_file_limit_to_the_hard_limit() -> None:
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from hubapp.serve import raise_open_file_limit\n"
        "print(raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE), hard)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    returned, soft, hard, hard_before = (int(x) for x in out.stdout.split())
    assert soft == hard == hard_before == returned
