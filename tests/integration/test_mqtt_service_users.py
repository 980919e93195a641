"""Service users (`mqtt_password_file`) on the real embedded broker, with paho clients.

The broker runs in process with a dispatcher double (as in test_mqtt_acl.py);
the last test sends SIGHUP to a real `hub run`. The password file is written
by `mosquitto_passwd`, as an operator would.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.errors import ConfigError
from tests.integration.test_embedded import _env
from tests.integration.test_mqtt_acl import received
from tests.integration.test_mqtt_embedded import WAIT_S, Broker, Client, acked, telemetry
from tests.support.processes import ROOT, wait_until
from tests.support.services import free_port

Make = Callable[..., Client]

READER_ACL = """\
user reader
topic read devices/+/telemetry/#
pattern readwrite clients/%u/status
"""


def passwd(path: Path, name: str, password: str, *, create: bool = False) -> None:
    """Add a user to a password file with the real `mosquitto_passwd`."""
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is needed: apt-get install mosquitto"
    args = [tool, *(["-c"] if create else []), "-b", str(path), name, password]
    subprocess.run(args, check=True, timeout=30, capture_output=True)


@pytest.fixture
def clients() -> Iterator[Make]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        c = Client(*args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def users_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(acl: str | None, **overrides: Any) -> Broker:
        passwords = tmp_path / "passwords"
        if not passwords.exists():
            passwd(passwords, "reader", "reader-secret", create=True)
        if acl is not None:
            (tmp_path / "acl").write_text(acl)
            overrides["mqtt_acl_file"] = tmp_path / "acl"
        b = Broker(tmp_path / f"hub{len(started)}", mqtt_password_file=passwords, **overrides)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.close()


def failures(b: Broker, reason: str) -> float:
    return b.counter("hub_auth_failures_total", transport="mqtt", reason=reason)


def test_a_service_user_reads_device_telemetry_as_its_user_section_allows(
    users_broker: Callable[..., Broker], clients: Make
) -> None:
    b = users_broker(READER_ACL)
    reader = clients(b.port, "reader-1", "reader", "reader-secret")
    assert not reader.connect().is_failure
    assert not reader.subscribe("devices/+/telemetry/#")[0].is_failure
    device = clients(b.port, "dev-1", "dev-1", b.provision("dev-1"))
    assert not device.connect().is_failure

    assert acked(device.publish("devices/dev-1/telemetry", telemetry(1)))
    message = reader.messages.get(timeout=WAIT_S)
    assert message.topic == "devices/dev-1/telemetry"
    assert b"seq" in message.payload
    # Only the device's own message is bridged; the reader is not a device.
    assert [e.device_id for e in b.dispatcher.data()] == ["dev-1"]


def test_a_service_user_is_denied_everything_its_rules_do_not_grant(
    users_broker: Callable[..., Broker], clients: Make
) -> None:
    b = users_broker(READER_ACL)
    reader = clients(b.port, "reader-1", "reader", "reader-secret")
    assert not reader.connect().is_failure
    watcher = clients(b.port, "dev-2", "dev-2", b.provision("dev-2"))
    assert not watcher.connect().is_failure
    assert not watcher.subscribe("devices/dev-2/commands")[0].is_failure

    # The built-in rule of a device does not apply to it: default deny.
    for refused in ("devices/+/commands", "devices/#", "#", "clients/other/status"):
        assert reader.subscribe(refused)[0].is_failure, refused
    assert acked(reader.publish("devices/dev-2/commands", b'{"id": "c1", "name": "reboot"}'))
    assert acked(reader.publish("devices/dev-2/telemetry", telemetry(1)))  # read only
    assert received(watcher) == []
    assert b.dispatcher.data() == []
    assert b.counter("hub_acl_refusals_total", action="publish") == 2
    assert b.counter("hub_acl_refusals_total", action="subscribe") == 4
    # A pattern with %u: its own status topic, both ways.
    assert not reader.subscribe("clients/reader/status")[0].is_failure
    assert acked(reader.publish("clients/reader/status", b"up"))
    assert reader.messages.get(timeout=WAIT_S).payload == b"up"


def test_a_wrong_password_is_refused_and_counted(
    users_broker: Callable[..., Broker], clients: Make
) -> None:
    b = users_broker(READER_ACL)
    before = failures(b, "bad_credential")
    wrong = clients(b.port, "reader-1", "reader", "not-the-secret")
    assert wrong.connect().value == 134  # return code 4: bad user name or password
    none = clients(b.port, "reader-2", "reader")
    assert none.connect().is_failure
    # A device's credential does not open a service user's account either.
    b.provision("reader")
    as_device = clients(b.port, "reader-3", "reader", "secret-of-reader")
    assert as_device.connect().is_failure
    assert failures(b, "bad_credential") == before + 3


def test_without_an_acl_file_a_service_user_may_do_nothing(
    users_broker: Callable[..., Broker], clients: Make
) -> None:
    b = users_broker(None, mqtt_allow_anonymous=True)
    reader = clients(b.port, "reader-1", "reader", "reader-secret")
    assert not reader.connect().is_failure
    assert reader.subscribe("devices/+/telemetry/#")[0].is_failure
    assert reader.subscribe("anything")[0].is_failure
    anonymous = clients(b.port, "anon")
    assert not anonymous.connect().is_failure
    assert not anonymous.subscribe("anything")[0].is_failure  # a plain broker for them


def test_a_client_id_held_by_a_service_user_is_its_own(
    users_broker: Callable[..., Broker], clients: Make
) -> None:
    b = users_broker(READER_ACL, mqtt_allow_anonymous=True)
    reader = clients(b.port, "shared-id", "reader", "reader-secret")
    assert not reader.connect().is_failure
    device = clients(b.port, "shared-id", "d", b.provision("d"))
    for other in (clients(b.port, "shared-id"), device):
        assert other.connect().is_failure
    assert failures(b, "client_id_in_use") == 2
    assert reader.client.is_connected() and not reader.disconnected.is_set()


def test_a_reload_reads_the_password_file_again(
    users_broker: Callable[..., Broker], clients: Make, tmp_path: Path
) -> None:
    b = users_broker(READER_ACL + "user writer\ntopic write out/#\n")
    reader = clients(b.port, "reader-1", "reader", "reader-secret")
    assert not reader.connect().is_failure
    assert clients(b.port, "writer-1", "writer", "w").connect().is_failure

    passwd(tmp_path / "passwords", "writer", "w")
    b.call_soon(b.mqtt.reload_access)
    assert not clients(b.port, "writer-2", "writer", "w").connect().is_failure
    # A file that no longer parses keeps the users in force.
    with (tmp_path / "passwords").open("a") as f:
        f.write("broken line\n")
    b.call_soon(b.mqtt.reload_access)
    assert not clients(b.port, "writer-3", "writer", "w").connect().is_failure
    assert wait_until(reader.client.is_connected, timeout=WAIT_S)
    assert not reader.disconnected.is_set()


def test_a_plain_text_password_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    passwd(path, "reader", "reader-secret", create=True)
    with path.open("a") as f:
        f.write("ops:plaintext\n")
    with pytest.raises(ConfigError, match=r"passwords, line 2: user 'ops': .*plain passwords"):
        Broker(tmp_path / "hub", mqtt_password_file=path)


def test_sighup_reloads_the_password_file_of_hub_run(tmp_path: Path, clients: Make) -> None:
    # No ACL file: the password file alone is reason enough to reload on SIGHUP.
    passwords = tmp_path / "passwords"
    passwd(passwords, "first", "one", create=True)
    mqtt_port = free_port()
    env = _env(tmp_path / "data", HUB_MQTT_PASSWORD_FILE=str(passwords))
    log = (tmp_path / "hub.log").open("w+")
    ports = ["--tcp-port", str(free_port()), "--http-port", str(free_port())]
    hub = subprocess.Popen(
        [sys.executable, "-m", "hubapp.cli", "run", "--no-worker", *ports],
        cwd=ROOT,
        env={**env, "HUB_MQTT_PORT": str(mqtt_port)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def output() -> str:
        return (tmp_path / "hub.log").read_text()

    try:
        assert wait_until(lambda: "Press Ctrl+C" in output(), timeout=90), output()
        assert "neither publish nor subscribe" in output()  # no ACL file: a warning
        first = clients(mqtt_port, "first-1", "first", "one")
        assert not first.connect().is_failure
        assert clients(mqtt_port, "second-1", "second", "two").connect().is_failure
        passwd(passwords, "second", "two")
        hub.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded (2 users)" in output(), timeout=WAIT_S), output()
        assert not clients(mqtt_port, "second-2", "second", "two").connect().is_failure
        assert hub.poll() is None and first.client.is_connected()
        assert not first.disconnected.is_set()
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait(10)
        log.close()
    assert hub.returncode == 0, output()
