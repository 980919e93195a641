"""MQTT over TLS and mutual TLS on the embedded broker, with certificates made in the test.

The real embedded broker on free ports with a dispatcher double (as in
test_mqtt_embedded), real TLS handshakes by paho and `mosquitto_pub`, and a
CA, device certificates and a CRL made by `hubapp.certificates`.
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.errors import ConfigError
from hubapp import certificates
from tests.integration.test_cli import hub_cli
from tests.integration.test_mqtt_embedded import WAIT_S, Broker, Client, acked, telemetry
from tests.support.processes import wait_until


def free_port() -> int:
    # mqtt_tls_port = 0 turns TLS off, so the test picks a free port itself.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    certificates.init_ca(directory)
    return directory


def tls_settings(ca: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "mqtt_tls_port": free_port(),
        "tls_cert_file": ca / certificates.HUB_CERT,
        "tls_key_file": ca / certificates.HUB_KEY,
        "tls_ca_file": ca / certificates.CA_CERT,
        **overrides,
    }


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(**overrides: Any) -> Broker:
        b = Broker(tmp_path / f"hub{len(started)}", **overrides)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(
        b: Broker,
        client_id: str,
        ca: Path,
        username: str | None = None,
        password: str | None = None,
        cert: certificates.Issued | None = None,
    ) -> Client:
        port = b.mqtt.tls_port
        assert port is not None
        c = Client(port, client_id, username, password)
        c.client.tls_set(
            ca_certs=str(ca / certificates.CA_CERT),
            certfile=str(cert.cert) if cert else None,
            keyfile=str(cert.key) if cert else None,
        )
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def handshake_failures(b: Broker) -> float:
    return b.counter("hub_connections_refused_total", transport="mqtt", reason="tls_handshake")


def refused(c: Client) -> bool:
    """True when the TLS client gets no accepted CONNACK: the handshake fails at
    once, or (TLS 1.3 checks the client's certificate after the client's side
    of the handshake ends) the connection is closed before a CONNACK."""
    try:
        c.client.connect("127.0.0.1", c.port, keepalive=30)
    except (ssl.SSLError, OSError):
        return True
    c.client.loop_start()
    wait_until(
        lambda: c.connack_event.is_set() or c.disconnected.is_set(), timeout=WAIT_S, interval=0.02
    )
    return c.connack is None or c.connack.is_failure


def test_paho_publishes_over_tls_with_a_credential(
    broker: Callable[..., Broker], clients: Callable[..., Client], ca: Path
) -> None:
    b = broker(**tls_settings(ca))
    credential = b.provision("dev-1")
    dev = clients(b, "dev-1", ca, "dev-1", credential)
    assert not dev.connect().is_failure
    assert acked(dev.publish("devices/dev-1/telemetry", telemetry(1, t=20.5)))
    [envelope] = b.dispatcher.data("dev-1")
    assert (envelope.seq, dict(envelope.payload)) == (1, {"t": 20.5})
    # The plain listener still serves, on its own port.
    assert b.port != b.mqtt.tls_port


def test_tls_listener_keeps_authentication(
    broker: Callable[..., Broker], clients: Callable[..., Client], ca: Path
) -> None:
    b = broker(**tls_settings(ca))
    b.provision("dev-1")
    dev = clients(b, "dev-1", ca, "dev-1", "not-the-credential")
    assert dev.connect().is_failure
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="bad_credential") == 1


def test_mutual_tls_names_the_device_without_a_credential(
    broker: Callable[..., Broker], clients: Callable[..., Client], ca: Path, tmp_path: Path
) -> None:
    b = broker(**tls_settings(ca, tls_identity="cn", tls_require_certificate=True))
    b.provision("meter-7")
    cert = certificates.issue_device(ca, "meter-7", tmp_path / "certs")
    dev = clients(b, "any-client-id", ca, cert=cert)
    assert not dev.connect().is_failure
    assert acked(dev.publish("devices/meter-7/telemetry", telemetry(1)))
    assert [e.device_id for e in b.dispatcher.data()] == ["meter-7"]
    # The ACL is the device's: another device's topic is refused.
    dev.publish("devices/other/telemetry", telemetry(2))
    assert wait_until(
        lambda: b.counter("hub_acl_refusals_total", action="publish") == 1, timeout=WAIT_S
    )


def test_san_identity_and_unknown_device_is_refused_and_counted(
    broker: Callable[..., Broker], clients: Callable[..., Client], ca: Path, tmp_path: Path
) -> None:
    b = broker(**tls_settings(ca, tls_identity="san"))
    b.provision("meter-1")
    known = clients(b, "c1", ca, cert=certificates.issue_device(ca, "meter-1", tmp_path))
    assert not known.connect().is_failure
    stranger = clients(b, "c2", ca, cert=certificates.issue_device(ca, "ghost", tmp_path))
    assert stranger.connect().is_failure
    assert b.counter("hub_auth_failures_total", transport="mqtt", reason="unknown_device") == 1
    assert b.refreshed == ["ghost"]  # looked up once in the registry before refusing


@pytest.mark.parametrize("kind", ["other_ca", "expired", "revoked"])
def test_bad_client_certificates_are_refused(
    broker: Callable[..., Broker],
    clients: Callable[..., Client],
    ca: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    out = tmp_path / "certs"
    if kind == "other_ca":
        other = tmp_path / "other-ca"
        certificates.init_ca(other, name="someone else's CA")
        cert = certificates.issue_device(other, "meter-1", out)
    elif kind == "expired":
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        cert = certificates.issue(ca, "meter-1", out, valid_from=long_ago, valid_days=1)
    else:
        cert = certificates.issue_device(ca, "meter-1", out)
        certificates.revoke(ca, cert.cert)
    b = broker(**tls_settings(ca, tls_identity="cn", tls_crl_file=ca / certificates.CA_CRL))
    b.provision("meter-1")
    assert refused(clients(b, "c1", ca, cert=cert))
    assert wait_until(lambda: handshake_failures(b) >= 1, timeout=WAIT_S)
    # A good certificate still gets in after the refusal: the listener is unharmed.
    good = clients(b, "c2", ca, cert=certificates.issue_device(ca, "meter-1", tmp_path / "good"))
    assert not good.connect().is_failure
    assert b.dispatcher.data() == []


def test_mosquitto_pub_over_mutual_tls(
    broker: Callable[..., Broker], ca: Path, tmp_path: Path
) -> None:
    binary = shutil.which("mosquitto_pub")
    assert binary, "mosquitto_pub is missing: apt-get install mosquitto-clients (scripts/test does)"
    b = broker(**tls_settings(ca, tls_identity="cn", tls_require_certificate=True))
    b.provision("meter-3")
    cert = certificates.issue_device(ca, "meter-3", tmp_path / "certs")
    tls = ["--cafile", str(ca / certificates.CA_CERT), "--cert", str(cert.cert), "--key"]
    port = str(b.mqtt.tls_port)
    message = ["-t", "devices/meter-3/telemetry", "-m", telemetry(5).decode()]
    result = subprocess.run(
        [
            binary,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-i",
            "m3",
            "-q",
            "1",
            *tls,
            str(cert.key),
            *message,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert [e.seq for e in b.dispatcher.data("meter-3")] == [5]


def test_tls_port_zero_or_no_certificate_turns_tls_off(
    broker: Callable[..., Broker], ca: Path
) -> None:
    assert broker(**tls_settings(ca, mqtt_tls_port=0)).mqtt.tls_port is None
    assert broker(mqtt_tls_port=free_port()).mqtt.tls_port is None


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("tls_key_file", "missing.key", r"setting 'tls_key_file' \(HUB_TLS_KEY_FILE\).*No such"),
        ("tls_cert_file", "missing.crt", r"setting 'tls_cert_file' \(HUB_TLS_CERT_FILE\)"),
        ("tls_ca_file", "missing.crt", r"setting 'tls_ca_file' \(HUB_TLS_CA_FILE\)"),
        ("tls_crl_file", "ca.crt", r"setting 'tls_crl_file' .*holds no X509 CRL"),
        ("tls_key_file", "ca.key", r"setting 'tls_key_file'.*not an unencrypted PEM key"),
        ("tls_cert_file", "crl.pem", r"setting 'tls_cert_file'.*not a valid PEM"),
    ],
)
def test_bad_tls_files_are_a_config_error_naming_the_setting(
    tmp_path: Path, ca: Path, setting: str, value: str, message: str
) -> None:
    b = Broker(tmp_path / "hub", **tls_settings(ca, **{setting: ca / value}))
    try:
        with pytest.raises(ConfigError, match=message):
            b.call(b.mqtt.start())
    finally:
        b.close()


def test_hub_run_with_a_missing_key_file_says_so_in_one_line(tmp_path: Path, ca: Path) -> None:
    result = hub_cli(
        tmp_path,
        "run",
        env={
            "HUB_MQTT_TLS_PORT": str(free_port()),
            "HUB_TLS_CERT_FILE": str(ca / certificates.HUB_CERT),
            "HUB_TLS_KEY_FILE": str(tmp_path / "nowhere.key"),
        },
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # One line (besides any warning logged before it, such as the file limit's).
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("hub:")]
    assert line.startswith("hub: configuration error: setting 'tls_key_file' (HUB_TLS_KEY_FILE)")
    assert "nowhere.key" in line


def test_packet_limits_apply_over_tls(
    broker: Callable[..., Broker], clients: Callable[..., Client], ca: Path
) -> None:
    b = broker(**tls_settings(ca, mqtt_max_packet_bytes=1024))
    dev = clients(b, "dev-1", ca, "dev-1", b.provision("dev-1"))
    assert not dev.connect().is_failure
    dev.publish("devices/dev-1/telemetry", json.dumps({"blob": "x" * 2000}))
    assert dev.disconnected.wait(WAIT_S)
    assert b.counter("hub_protocol_errors_total", transport="mqtt", reason="packet_too_large") == 1
    assert b.dispatcher.data() == []


def test_plain_mqtt_on_the_tls_port_fails_cleanly(
    broker: Callable[..., Broker], clients: Callable[..., Client], ca: Path
) -> None:
    b = broker(**tls_settings(ca, mqtt_connect_timeout_s=1.0))
    port = b.mqtt.tls_port
    assert port is not None
    silent = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as plain:
        # A clear-text CONNECT (protocol MQTT 3.1.1, client id "x") is no TLS hello.
        plain.sendall(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01x")
        # Answered with a TLS alert at most, then closed.
        assert wait_until(lambda: _closed(plain), timeout=WAIT_S)
    with silent:
        # A client that never starts its handshake is closed by the handshake timeout.
        assert wait_until(lambda: _closed(silent), timeout=WAIT_S)
    assert wait_until(lambda: handshake_failures(b) == 2, timeout=WAIT_S)
    dev = clients(b, "dev-1", ca, "dev-1", b.provision("dev-1"))
    assert not dev.connect().is_failure


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_tls_min_version_refuses_older_clients(broker: Callable[..., Broker], ca: Path) -> None:
    b = broker(**tls_settings(ca, tls_min_version="1.3"))
    context = ssl.create_default_context(cafile=ca / certificates.CA_CERT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", b.mqtt.tls_port or 0), timeout=WAIT_S) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", b.mqtt.tls_port or 0), timeout=WAIT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
