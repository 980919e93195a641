"""SIGHUP reloads the TLS files of a real `hub run`: the certificate, key and
CRL of MQTT over TLS and of a `tls = true` TCP listener, keeping connections.

Everything is real: the hub is a child process sent a real SIGHUP, the
clients are paho (MQTT over mutual TLS) and a native TCP device over `ssl`,
and the certificates and CRL are made by `hubapp.certificates` in the test.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from hub.protocol.events import Ack
from hubapp import certificates
from tests.integration.test_cli import hub_cli
from tests.integration.test_embedded import _env
from tests.integration.test_mqtt_embedded import WAIT_S, Client, acked, telemetry
from tests.integration.test_mqtt_tls import free_port, refused
from tests.support.processes import ROOT, wait_until
from tests.support.raw_device import RawDevice


class TlsHub:
    """`hub run --no-worker` with MQTT over TLS and a native TCP listener over TLS,
    serving copies of the CA folder's files (so that the test can replace them)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ca = tmp_path / "ca"
        certificates.init_ca(self.ca)
        self.files = tmp_path / "tls"
        self.files.mkdir()
        for name, copy in (
            (certificates.HUB_CERT, "server.crt"),
            (certificates.HUB_KEY, "server.key"),
            (certificates.CA_CRL, "crl.pem"),
        ):
            shutil.copyfile(self.ca / name, self.files / copy)
        self.cert, self.key, self.crl = (
            self.files / "server.crt",
            self.files / "server.key",
            self.files / "crl.pem",
        )
        self.mqtt_tls_port, self.tcp_tls_port = free_port(), free_port()
        config = tmp_path / "hub.toml"
        config.write_text(
            f'[[tcp_listeners]]\nport = {self.tcp_tls_port}\ncodec = "native"\ntls = true\n'
        )
        self.env = _env(
            tmp_path / "data",
            HUB_CONFIG=str(config),
            HUB_MQTT_TLS_PORT=str(self.mqtt_tls_port),
            HUB_TLS_CERT_FILE=str(self.cert),
            HUB_TLS_KEY_FILE=str(self.key),
            HUB_TLS_CA_FILE=str(self.ca / certificates.CA_CERT),
            HUB_TLS_CRL_FILE=str(self.crl),
            HUB_TLS_IDENTITY="cn",
            # uvloop reads an accepted socket at once (bridges.mqtt.listener, _TlsFirstProtocol).
            HUB_EVENT_LOOP="uvloop",
        )
        self.log_path = tmp_path / "hub.log"
        self.process: subprocess.Popen[str] | None = None

    def add_device(self, device_id: str) -> tuple[str, certificates.Issued]:
        """`hub devices add ID --cert-out DIR`: its credential and certificate."""
        out = self.tmp / device_id
        added = hub_cli(
            self.tmp,
            "devices",
            "add",
            device_id,
            "--cert-out",
            str(out),
            "--ca-dir",
            str(self.ca),
            "--json",
        )
        assert added.returncode == 0, added.stderr
        shown = json.loads(added.stdout)
        return shown["credential"], certificates.Issued(
            Path(shown["cert_file"]), Path(shown["key_file"])
        )

    def start(self) -> None:
        ports = ["--http-port", str(free_port()), "--mqtt-port", str(free_port())]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hubapp.cli", "run", "--no-worker", *ports],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        assert wait_until(lambda: "Press Ctrl+C" in self.output(), timeout=90), self.output()

    def output(self) -> str:
        return self.log_path.read_text()

    def sighup(self, expect: str) -> None:
        """Send SIGHUP and wait for one more log line holding `expect`."""
        assert self.process is not None
        before = self.output().count(expect)
        self.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: self.output().count(expect) > before, timeout=WAIT_S), (
            self.output()
        )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        assert self.process.returncode == 0, self.output()

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca / certificates.CA_CERT)


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[TlsHub]:
    hub = TlsHub(tmp_path)
    yield hub
    hub.stop()


def served(hub: TlsHub, port: int) -> bytes:
    """The DER certificate a new TLS connection to `port` is served."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        hub.client_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def mqtt_device(hub: TlsHub, device_id: str, issued: certificates.Issued) -> Client:
    """A paho device over mutual TLS: its certificate names it, no password."""
    c = Client(hub.mqtt_tls_port, device_id)
    c.client.tls_set(
        ca_certs=str(hub.ca / certificates.CA_CERT),
        certfile=str(issued.cert),
        keyfile=str(issued.key),
    )
    return c


def tcp_device(hub: TlsHub, device_id: str, credential: str) -> RawDevice:
    """A native device over TLS on the TCP listener, past its HELLO."""
    device = RawDevice(hub.tcp_tls_port)
    device.sock = hub.client_context().wrap_socket(device.sock, server_hostname="127.0.0.1")
    answer = device.hello(device_id, credential)
    assert isinstance(answer, Ack), answer
    return device


def test_sighup_rotates_the_certificate_and_keeps_every_connection(tls_hub: TlsHub) -> None:
    _, mqtt_cert = tls_hub.add_device("dev-mqtt")
    credential, _ = tls_hub.add_device("dev-tcp")
    tls_hub.start()
    first = der_of(tls_hub.cert)
    assert served(tls_hub, tls_hub.mqtt_tls_port) == first
    assert served(tls_hub, tls_hub.tcp_tls_port) == first
    mqtt = mqtt_device(tls_hub, "dev-mqtt", mqtt_cert)
    try:
        assert not mqtt.connect().is_failure
        tcp = tcp_device(tls_hub, "dev-tcp", credential)

        # A new server certificate and key, written over the files in place.
        certificates.issue(
            tls_hub.ca,
            "hub",
            tls_hub.files,
            names=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            server=True,
            stem="server",
        )
        second = der_of(tls_hub.cert)
        assert second != first
        tls_hub.sighup("TLS files reloaded")
        assert served(tls_hub, tls_hub.mqtt_tls_port) == second
        assert served(tls_hub, tls_hub.tcp_tls_port) == second

        # The connections made before the reload are still served.
        assert acked(mqtt.publish("devices/dev-mqtt/telemetry", telemetry(1)))
        assert mqtt.client.is_connected() and not mqtt.disconnected.is_set()
        tcp.telemetry(1, {"t": 1})
        assert 1 in tcp.acks_until(1)

        # A file that no longer loads: one line naming the setting, the old context stays.
        tls_hub.cert.write_text("not a certificate\n")
        tls_hub.sighup("TLS files not reloaded")
        line = next(ln for ln in tls_hub.output().splitlines() if "TLS files not reloaded" in ln)
        assert "tls_cert_file" in line and "HUB_TLS_CERT_FILE" in line
        assert "Traceback" not in tls_hub.output()
        assert served(tls_hub, tls_hub.mqtt_tls_port) == second
        assert served(tls_hub, tls_hub.tcp_tls_port) == second
        tcp.telemetry(2, {"t": 2})
        assert 2 in tcp.acks_until(2)
        tcp.close()
    finally:
        mqtt.close()


def test_sighup_reloads_the_crl_and_a_revoked_device_is_refused(tls_hub: TlsHub) -> None:
    _, kept = tls_hub.add_device("dev-kept")
    _, revoked = tls_hub.add_device("dev-revoked")
    tls_hub.start()
    before = mqtt_device(tls_hub, "dev-revoked", revoked)
    stays = mqtt_device(tls_hub, "dev-kept", kept)
    again: Client | None = None
    try:
        assert not before.connect().is_failure
        assert not stays.connect().is_failure
        before.close()

        shutil.copyfile(certificates.revoke(tls_hub.ca, revoked.cert), tls_hub.crl)
        tls_hub.sighup("TLS files reloaded")
        again = mqtt_device(tls_hub, "dev-revoked", revoked)
        assert refused(again)
        # The other device, connected all along, is untouched and may reconnect.
        assert acked(stays.publish("devices/dev-kept/telemetry", telemetry(1)))
        assert not stays.disconnected.is_set()
        stays.close()
        assert not mqtt_device(tls_hub, "dev-kept", kept).connect().is_failure
    finally:
        stays.close()
        if again is not None:
            again.close()
