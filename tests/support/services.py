"""Reaching the real services the integration tests need, or failing loudly.

Nothing here skips: a missing service fails the test with the command that
starts it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid

import pytest

RABBITMQ_HOST = "127.0.0.1"
RABBITMQ_PORT = 5672
MOSQUITTO_PORT = 1883

START_RABBITMQ = (
    "start RabbitMQ on 127.0.0.1:5672 (guest/guest): `rabbitmq-server -detached` "
    "(Debian: `apt-get install -y rabbitmq-server` first), or run `scripts/test`, "
    "which installs and starts what is missing"
)
START_MOSQUITTO = (
    "start Mosquitto on 127.0.0.1:1883: `mosquitto -d` "
    "(Debian: `apt-get install -y mosquitto` first), or run `scripts/test`"
)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_rabbitmq() -> None:
    if not port_open(RABBITMQ_HOST, RABBITMQ_PORT):
        pytest.fail(f"RabbitMQ is not reachable: {START_RABBITMQ}", pytrace=False)


def require_mosquitto() -> None:
    if not port_open("127.0.0.1", MOSQUITTO_PORT):
        pytest.fail(f"Mosquitto is not reachable: {START_MOSQUITTO}", pytrace=False)


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail(
            "rabbitmqctl is not on PATH; the tests create their own RabbitMQ vhost with it: "
            + START_RABBITMQ,
            pytrace=False,
        )
    result = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}", pytrace=False)


def create_vhost() -> str:
    """A fresh vhost for this test run; the caller deletes it with `delete_vhost`."""
    require_rabbitmq()
    vhost = f"hubtest-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost


def delete_vhost(vhost: str) -> None:
    _rabbitmqctl("delete_vhost", vhost)


def amqp_url(vhost: str, port: int = RABBITMQ_PORT) -> str:
    return f"amqp://guest:guest@{RABBITMQ_HOST}:{port}/{vhost}"
