"""Liveness and readiness over HTTP, GET and HEAD, against a real hub.

`/healthz` said ok while the hub spooled because RabbitMQ was away, and HEAD
got 405. Liveness (`/healthz`, `/livez`) says the process answers; readiness
(`/readyz`) says whether devices' messages reach the task broker.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import pytest

from hub.protocol.events import Ack
from tests.support.processes import HubThread, wait_until
from tests.support.raw_device import RawDevice
from tests.support.services import free_port

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
Provision = Callable[[list[str]], dict[str, str]]
Connect = Callable[[int], RawDevice]
PATHS = ["/healthz", "/livez", "/readyz", "/status", "/metrics"]


def request(hub: HubThread, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    assert hub.app.http is not None
    conn = http.client.HTTPConnection("127.0.0.1", hub.app.http.port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def readiness(hub: HubThread) -> tuple[int, dict[str, object]]:
    status, _, body = request(hub, "GET", "/readyz")
    return status, json.loads(body)


def send_one(hub: HubThread, provision: Provision, connect: Connect, device_id: str) -> None:
    ((_, credential),) = provision([device_id]).items()
    device = connect(hub.tcp_port)
    assert device.hello(device_id, credential) == Ack(0)
    device.telemetry(1, {"n": 1})
    assert device.acks_until(1) == {1}


def test_ready_and_every_path_answers_head(
    running_hub: StartHub, provision: Provision, connect: Connect, device_prefix: str
) -> None:
    hub = running_hub(mqtt_enabled=True)
    send_one(hub, provision, connect, f"{device_prefix}1")
    assert readiness(hub) == (200, {"ready": True, "reasons": []})
    for path in PATHS:
        got, got_headers, got_body = request(hub, "GET", path)
        status, headers, body = request(hub, "HEAD", path)
        assert (status, body) == (got, b""), path
        assert headers["Content-Type"] == got_headers["Content-Type"]
        if path != "/metrics":  # the counters move between the two requests
            assert int(headers["Content-Length"]) == len(got_body), path
    status, headers, _ = request(hub, "POST", "/readyz")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_not_ready_while_spooling_but_alive(
    running_hub: StartHub, provision: Provision, connect: Connect, device_prefix: str
) -> None:
    # RabbitMQ "away": a port where nothing listens; the hub starts and spools.
    hub = running_hub(
        broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//", start_without_broker=True
    )
    assert readiness(hub)[0] == 200  # nothing tried yet: the start-up check let it start
    send_one(hub, provision, connect, f"{device_prefix}1")  # acknowledged from the spool
    status, body = readiness(hub)
    assert status == 503 and body["ready"] is False
    reasons = " ".join(body["reasons"])  # type: ignore[arg-type]
    assert (
        "spooling: 2 envelopes" in reasons
    )  # the presence and the message and "task broker unreachable" in reasons
    for path in ("/healthz", "/livez"):
        assert request(hub, "GET", path)[:1] == (200,)
    assert request(hub, "HEAD", "/readyz")[0] == 503


def test_not_ready_while_a_listener_is_down(running_hub: StartHub) -> None:
    hub = running_hub()
    assert readiness(hub)[0] == 200
    hub.call(hub.app.tcp_servers[0].stop())
    assert wait_until(lambda: readiness(hub)[0] == 503, timeout=10)
    assert readiness(hub)[1]["reasons"] == ["1 of 1 TCP listeners not serving"]
    assert request(hub, "GET", "/healthz")[0] == 200
