"""The fuzz corpus of the MQTT reader, replayed over real MQTT-over-TLS connections.

`python -m fuzz mqtt` drives `PacketReader` in process, where coverage guides it
(docs/fuzzing.md). MQTT over TLS adds no parser of ours, but it does add a path:
the TLS listener's own accept loop, the handshake, and OpenSSL's reads in front
of the same reader. Here every client stream of the kept corpus (and the seeds)
is sent, decrypted by the hub, through a real TLS connection to a real embedded
broker, one connection per input. What must hold afterwards: the broker still
serves a device over TLS, every one of those connections is closed or closes
within the CONNECT timeout (no descriptor held), and what was malformed was
counted.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz import mqtt as mqtt_target
from hubapp import certificates
from tests.integration.test_mqtt_compliance import (
    PUBACK,
    Raw,
    connect_packet,
    free_port,
    publish_packet,
)
from tests.integration.test_mqtt_embedded import Broker as HubThread
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus" / "mqtt"
CONNECT_TIMEOUT_S = 1.0
MAX_PACKET = 1024  # as the fuzz target's, so the corpus reaches the size refusal


def client_streams() -> list[bytes]:
    """The inputs that are a client's whole stream in the clear (bit 0 set, bit 2
    clear: not WebSocket frames), corpus and seeds, without the selector byte."""
    inputs = [path.read_bytes() for path in sorted(CORPUS.iterdir())]
    inputs += list(mqtt_target.seeds())
    streams = {data[1:] for data in inputs if data and data[0] & 1 and not data[0] & 4}
    return sorted(streams)


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[tuple[HubThread, ssl.SSLContext]]:
    ca = tmp_path / "ca"
    certificates.init_ca(ca)
    hub = HubThread(
        tmp_path / "hub",
        mqtt_tls_port=free_port(),
        tls_cert_file=ca / certificates.HUB_CERT,
        tls_key_file=ca / certificates.HUB_KEY,
        mqtt_connect_timeout_s=CONNECT_TIMEOUT_S,
        mqtt_max_packet_bytes=MAX_PACKET,
        # Hundreds of connections from one address, many with bad logins: the
        # limits per source address are tested elsewhere (test_address_limits).
        auth_failures_per_address=0,
        max_connects_per_address_per_s=0,
    ).start()
    try:
        yield hub, ssl.create_default_context(cafile=str(ca / certificates.CA_CERT))
    finally:
        hub.close()


def send_over_tls(port: int, context: ssl.SSLContext, stream: bytes) -> None:
    """One connection: the handshake, the stream, then read until the hub closes
    (or the deadline: a stream that is a valid session waits for more)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        try:
            tls.sendall(stream)
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                tls.settimeout(max(0.01, deadline - time.monotonic()))
                if not tls.recv(4096):
                    return
        except (OSError, ssl.SSLError):
            return  # closed by the hub mid-write or without close_notify


def test_the_reader_corpus_over_tls_closes_only_its_own_connections(
    tls_hub: tuple[HubThread, ssl.SSLContext],
) -> None:
    hub, context = tls_hub
    port = hub.mqtt.tls_port
    assert port is not None
    streams = client_streams()
    assert len(streams) > 50, "the corpus of the mqtt fuzz target is missing"
    credential = hub.provision("dev-1")

    for stream in streams:
        send_over_tls(port, context, stream)

    # Every fuzz connection ends: the bad ones at once, a valid but idle one at
    # the CONNECT timeout or its keep-alive; none is left holding the broker.
    assert wait_until(lambda: hub.call_soon(lambda: hub.mqtt.connected_devices) == 0, timeout=15)
    refused = hub.counter("hub_connections_refused_total", transport="mqtt", reason="tls_handshake")
    assert refused == 0, "a fuzz input broke a TLS handshake that had succeeded"
    malformed = sum(
        sample.value
        for metric in hub.metrics.registry.collect()
        if metric.name == "hub_protocol_errors"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("transport") == "mqtt"
    )
    assert malformed > 0, "no input of the corpus was counted as a protocol error"

    # And the broker still serves a device over TLS.
    raw = Raw(port, context)
    raw.send(connect_packet("dev-1", ("dev-1", credential)))
    assert raw.connack() == (False, 0)
    raw.send(publish_packet("devices/dev-1/telemetry", b'{"seq": 1, "values": {"t": 1}}', 1, 7))
    assert raw.expect(PUBACK).pid == 7
    raw.close()
