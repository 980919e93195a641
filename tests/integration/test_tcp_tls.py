"""The native protocol over TLS (`tls = true` on a `tcp_listeners` entry), with
certificates made in the test.

Real hub (in process), real RabbitMQ, a real worker, real TLS handshakes by
the simulated devices, and a CA and device certificates made by
`hubapp.certificates`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from firmware_sim.fleet import FleetOptions, FleetSummary, run_fleet
from hub.protocol.discovery import load_codec
from hub.protocol.events import Hello, Role
from hub.storage import count_rows
from hubapp import certificates
from tests.integration.test_cli import hub_cli
from tests.support.processes import HubThread, Worker, wait_until

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]

CLEAR = {"port": 0, "codec": "native"}
OVER_TLS = {"port": 0, "codec": "native", "tls": True}


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    certificates.init_ca(directory)
    return directory


def tls_settings(ca: Path, *listeners: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {
        "tcp_listeners": listeners or (OVER_TLS,),
        "tls_cert_file": ca / certificates.HUB_CERT,
        "tls_key_file": ca / certificates.HUB_KEY,
        "tls_ca_file": ca / certificates.CA_CERT,
        **overrides,
    }


def port(hub: HubThread, *, tls: bool) -> int:
    return next(s.port for s in hub.app.tcp_servers if s.tls is tls)


def fleet(
    hub: HubThread, creds: dict[str, str], ca: Path | None, messages: int, **kw: Any
) -> FleetSummary:
    options = FleetOptions(
        transport="tcp",
        host="127.0.0.1",
        port=port(hub, tls=ca is not None),
        devices=list(creds.items()),
        messages=messages,
        tls=ca is not None,
        tls_ca_file=None if ca is None else ca / certificates.CA_CERT,
        **kw,
    )
    return asyncio.run(run_fleet(options))


def handshake_failures(hub: HubThread) -> float:
    return hub.counter("hub_connections_refused_total", transport="tcp", reason="tls_handshake")


def closed(sock: socket.socket, within_s: float) -> bool:
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


def test_devices_over_tls_and_in_the_clear_are_all_acknowledged_and_stored(
    worker: Worker,
    running_hub: StartHub,
    provision: Provision,
    engine: Engine,
    device_prefix: str,
    ca: Path,
) -> None:
    secure = provision([f"{device_prefix}s{n}" for n in range(1, 11)])
    plain = provision([f"{device_prefix}p{n}" for n in range(1, 4)])
    hub = running_hub(**tls_settings(ca, CLEAR, OVER_TLS))

    over_tls = fleet(hub, secure, ca, messages=100)
    in_clear = fleet(hub, plain, None, messages=100)

    assert over_tls.acknowledged == over_tls.sent == 1000, over_tls
    assert over_tls.refused == 0 and over_tls.errors == 0
    assert in_clear.acknowledged == in_clear.sent == 300, in_clear
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= 1300)
    assert count_rows(engine, device_prefix=device_prefix) == 1300
    assert handshake_failures(hub) == 0


def test_a_plain_client_on_the_tls_port_fails_cleanly_and_others_are_served(
    running_hub: StartHub, provision: Provision, device_prefix: str, ca: Path
) -> None:
    creds = provision([f"{device_prefix}{n}" for n in range(1, 4)])
    hub = running_hub(**tls_settings(ca, hello_timeout_s=2.0))
    tls_port = port(hub, tls=True)
    hello = load_codec("native")(Role.DEVICE).send(
        Hello(device_id=f"{device_prefix}1", credential=creds[f"{device_prefix}1"], boot_id=1)
    )
    silent = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as plain:
        # A clear-text HELLO is no TLS hello: at most a TLS alert, then closed.
        plain.sendall(hello)
        assert closed(plain, within_s=5)
        # Meanwhile (the silent client still holding its socket) devices over TLS are served.
        summary = fleet(hub, creds, ca, messages=20)
        assert summary.acknowledged == summary.sent == 60, summary
    with silent:
        # A client that never starts its handshake is closed at the handshake timeout.
        assert closed(silent, within_s=10)
    assert wait_until(lambda: handshake_failures(hub) == 2, timeout=10)
    assert hub.counter("hub_messages_acked_total", transport="tcp") == 60
    assert hub.call_soon(lambda: len(hub.app.tcp_servers[0].connections)) == 0


def test_beyond_the_connection_limit_no_handshake_is_started(
    running_hub: StartHub, ca: Path
) -> None:
    hub = running_hub(**tls_settings(ca, tcp_max_connections=1))
    tls_port = port(hub, tls=True)
    server = hub.app.tcp_servers[0]
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as admitted:
        # Admitted, its handshake not even started: it counts against the limit.
        assert wait_until(lambda: hub.call_soon(lambda: server.handshakes_in_progress) == 1)
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as beyond:
            # Closed at once, before any handshake could start.
            assert closed(beyond, within_s=5)
        assert not closed(admitted, within_s=0.5)
        reason = "connection_limit"
        assert hub.counter("hub_connections_refused_total", transport="tcp", reason=reason) == 1
        assert handshake_failures(hub) == 0


def test_a_certificate_naming_another_device_is_refused_and_counted(
    running_hub: StartHub, provision: Provision, device_prefix: str, ca: Path, tmp_path: Path
) -> None:
    owner, other = f"{device_prefix}owner", f"{device_prefix}other"
    creds = provision([owner, other])
    issued = certificates.issue_device(ca, owner, tmp_path / "device")
    hub = running_hub(**tls_settings(ca, tls_identity="cn", tls_require_certificate=True))
    mutual = {"tls_cert_file": issued.cert, "tls_key_file": issued.key}

    named = fleet(hub, {owner: creds[owner]}, ca, messages=10, **mutual)
    # Its own valid credential does not help a device holding another's certificate.
    impostor = fleet(hub, {other: creds[other]}, ca, messages=10, give_up_s=3.0, **mutual)
    # Nor can a client without a certificate connect once one is required.
    anonymous = fleet(hub, {other: creds[other]}, ca, messages=1, give_up_s=3.0)

    assert named.acknowledged == named.sent == 10, named
    assert impostor.acknowledged == 0 and impostor.refused == 1, impostor
    assert anonymous.acknowledged == 0 and not anonymous.ok
    assert (
        hub.counter("hub_auth_failures_total", transport="tcp", reason="certificate_mismatch") == 1
    )
    assert wait_until(lambda: handshake_failures(hub) >= 1, timeout=10)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"HUB_TLS_CERT_FILE": "{ca}/crl.pem"},
            "hub: configuration error: setting 'tls_cert_file' (HUB_TLS_CERT_FILE)",
        ),
        (
            {"HUB_TLS_KEY_FILE": "{ca}/hub.key"},
            "hub: configuration error: tcp_listeners: the native listener on port",
        ),
    ],
    ids=["bad_certificate", "no_certificate"],
)
def test_a_tls_listener_with_a_bad_or_no_certificate_is_one_line(
    tmp_path: Path, ca: Path, env: dict[str, str], message: str
) -> None:
    certificates.revoke(ca)  # writes crl.pem: a PEM file, but no certificate
    config = tmp_path / "hub.toml"
    config.write_text("[[tcp_listeners]]\nport = 0\ncodec = 'native'\ntls = true\n")
    result = hub_cli(
        tmp_path,
        "run",
        env={
            "HUB_CONFIG": str(config),
            "HUB_MQTT_ENABLED": "false",
            **{k: v.format(ca=ca) for k, v in env.items()},
        },
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("hub:")]
    assert line.startswith(message), line
