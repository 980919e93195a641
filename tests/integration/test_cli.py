"""The `hub` command as a user runs it: real processes, real database."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub.envelope import Envelope
from hub.storage import store_envelopes
from tests.support.processes import ROOT


def hub_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    environ["HUB_DATA_DIR"] = str(tmp_path / "data")
    # Off, not on the default ports 8083/8084 that another hub may hold.
    environ["HUB_MQTT_WS_PORT"] = environ["HUB_MQTT_WSS_PORT"] = "0"
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hubapp.cli", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_devices_add_list_remove(tmp_path: Path) -> None:
    added = hub_cli(tmp_path, "devices", "add", "meter-1", "--json")
    assert added.returncode == 0, added.stderr
    credential = json.loads(added.stdout)["credential"]
    assert len(credential) >= 32

    listed = hub_cli(tmp_path, "devices", "list", "--json")
    assert [d["device_id"] for d in json.loads(listed.stdout)] == ["meter-1"]

    again = hub_cli(tmp_path, "devices", "add", "meter-1")
    assert again.returncode == 1 and "already registered" in again.stderr
    assert "Traceback" not in again.stderr

    assert hub_cli(tmp_path, "devices", "remove", "meter-1").returncode == 0
    gone = hub_cli(tmp_path, "devices", "remove", "meter-1")
    assert gone.returncode == 1 and "no device 'meter-1'" in gone.stderr


def test_telemetry_and_state_read_back_what_workers_stored(
    tmp_path: Path, engine: Engine, database_url: str
) -> None:
    envelopes = [
        Envelope(
            device_id="cli-dev",
            kind="telemetry",
            payload={"t": n},
            transport="tcp",
            protocol="native",
            seq=n,
        )
        for n in range(1, 6)
    ]
    store_envelopes(engine, envelopes)
    env = {"HUB_DATABASE_URL": database_url}
    shown = hub_cli(tmp_path, "telemetry", "cli-dev", "--last", "2", "--json", env=env)
    assert [row["payload"] for row in json.loads(shown.stdout)] == [{"t": 4}, {"t": 5}]
    state = hub_cli(tmp_path, "state", "cli-dev", "--json", env=env)
    assert json.loads(state.stdout)["last_values"] == {"t": 5}
    assert json.loads(state.stdout)["online"] is True
    missing = hub_cli(tmp_path, "state", "nobody", env=env)
    assert missing.returncode == 1 and "nothing stored" in missing.stderr


def test_a_bad_setting_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    result = hub_cli(tmp_path, "run", env={"HUB_TCP_PORT": "70000"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "HUB_TCP_PORT" in result.stderr and "70000" in result.stderr


@pytest.mark.parametrize("which", ["tcp", "http"])
def test_hub_run_on_a_port_in_use_names_the_setting(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"tcp": "0", "http": "0", which: port}
        result = hub_cli(
            tmp_path,
            "run",
            "--no-mqtt",
            "--host",
            "127.0.0.1",
            "--tcp-port",
            ports["tcp"],
            "--http-port",
            ports["http"],
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"HUB_{which.upper()}_PORT" in result.stderr and port in result.stderr


def test_ca_init_and_devices_add_cert_out_issue_a_device_certificate(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca_dir = tmp_path / "ca"
    no_ca = hub_cli(tmp_path, "devices", "add", "meter-9", "--cert-out", str(tmp_path / "c"))
    assert no_ca.returncode == 1 and "hub ca init" in no_ca.stderr, no_ca.stderr
    assert "meter-9" not in hub_cli(tmp_path, "devices", "list", "--json").stdout

    made = hub_cli(tmp_path, "ca", "init", "--dir", str(ca_dir))
    assert made.returncode == 0, made.stderr
    assert "HUB_TLS_CERT_FILE=" in made.stdout
    again = hub_cli(tmp_path, "ca", "init", "--dir", str(ca_dir))
    assert again.returncode == 1 and "exists already" in again.stderr

    out = tmp_path / "certs"
    added = hub_cli(
        tmp_path,
        "devices",
        "add",
        "meter-9",
        "--cert-out",
        str(out),
        "--ca-dir",
        str(ca_dir),
        "--json",
    )
    assert added.returncode == 0, added.stderr
    shown = json.loads(added.stdout)
    assert shown["cert_file"] == str(out / "meter-9.crt")
    cert = x509.load_pem_x509_certificate((out / "meter-9.crt").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meter-9"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["meter-9"]
    assert (out / "meter-9.key").stat().st_mode & 0o077 == 0  # the key is the owner's only

    # The next certificate for rotation, then the old one revoked.
    issued = hub_cli(
        tmp_path, "ca", "issue", "meter-9", "--out", str(tmp_path / "next"), "--dir", str(ca_dir)
    )
    assert issued.returncode == 0, issued.stderr
    assert (tmp_path / "next" / "meter-9.crt").exists()
    revoked = hub_cli(tmp_path, "ca", "revoke", str(out / "meter-9.crt"), "--dir", str(ca_dir))
    assert revoked.returncode == 0, revoked.stderr
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
