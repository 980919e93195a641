"""The console's HTTP API against a real `hub console` process, a real hub, RabbitMQ,
a worker and simulated devices."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from hub.protocol.events import Ack, ConnectionClosed, Nak
from hub.settings import Settings
from tests.support.console import ConsoleProcess, api, cli, make_token, make_user
from tests.support.processes import (
    HubThread,
    SimulatedDevice,
    Worker,
    make_test_settings,
    wait_until,
)
from tests.support.raw_device import RawDevice

pytestmark = pytest.mark.integration

StartHub = Callable[..., HubThread]
StartDevice = Callable[..., SimulatedDevice]


@pytest.fixture(scope="module")
def console_settings(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, database_url: str
) -> Settings:
    return make_test_settings(
        tmp_path_factory.mktemp("console"), broker_url=rabbitmq_url, database_url=database_url
    )


@pytest.fixture(scope="module")
def console(console_settings: Settings) -> Iterator[ConsoleProcess]:
    process = ConsoleProcess(console_settings, console_settings.data_dir / "console.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokens(console_settings: Settings) -> dict[str, str]:
    suffix = str(time.monotonic_ns())
    return {
        role: make_token(console_settings, f"{role}-{suffix}", role)
        for role in ("viewer", "operator", "admin")
    }


@pytest.fixture
def admin(console: ConsoleProcess, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    with api(console, tokens["admin"]) as client:
        yield client


@pytest.fixture
def viewer(console: ConsoleProcess, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    with api(console, tokens["viewer"]) as client:
        yield client


@pytest.fixture
def operator(console: ConsoleProcess, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    with api(console, tokens["operator"]) as client:
        yield client


def _create(admin: httpx.Client, device_id: str) -> str:
    answer = admin.post("/api/devices", json={"id": device_id})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["credential"])


def _device(client: httpx.Client, device_id: str) -> dict[str, Any]:
    answer = client.get(f"/api/devices/{device_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


# -- authentication and roles ------------------------------------------------------------


def test_nothing_answers_without_authentication_but_healthz_and_login(
    console: ConsoleProcess,
) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/login").status_code == 200
        for method, path in [
            ("GET", "/api/devices"),
            ("POST", "/api/devices"),
            ("GET", "/api/devices/x"),
            ("GET", "/api/hubs"),
            ("GET", "/api/events"),
            ("GET", "/api/commands/x"),
        ]:
            answer = anonymous.request(method, path)
            assert answer.status_code == 401, (method, path)
            assert "log in" in answer.json()["detail"]
        page = anonymous.get("/devices", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        bad = anonymous.get("/api/devices", headers={"Authorization": "Basic abc"})
        assert bad.status_code == 401 and "Bearer" in bad.json()["detail"]
        wrong = anonymous.get("/api/devices", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json() == {"detail": "unknown or revoked API token"}


def test_a_revoked_token_stops_working_at_once(
    console: ConsoleProcess, console_settings: Settings
) -> None:
    name = f"revoked-{time.monotonic_ns()}"
    token = make_token(console_settings, name, "viewer")
    with api(console, token) as client:
        assert client.get("/api/devices").status_code == 200
        removed = cli(console_settings, "tokens", "remove", name)
        assert removed.returncode == 0, removed.stderr
        answer = client.get("/api/devices")
    assert answer.status_code == 401
    assert answer.json()["detail"] == "unknown or revoked API token"


def test_roles_viewer_reads_operator_commands_admin_changes_devices(
    viewer: httpx.Client, operator: httpx.Client, admin: httpx.Client, device_prefix: str
) -> None:
    device_id = f"{device_prefix}roles"
    assert viewer.get("/api/devices").status_code == 200

    refused = viewer.post("/api/devices", json={"id": device_id})
    assert refused.status_code == 403
    assert "admin role" in refused.json()["detail"]
    assert operator.post("/api/devices", json={"id": device_id}).status_code == 403

    _create(admin, device_id)
    assert viewer.get(f"/api/devices/{device_id}").status_code == 200
    command = {"name": "ping", "ttl": 5}
    assert viewer.post(f"/api/devices/{device_id}/commands", json=command).status_code == 403
    assert operator.post(f"/api/devices/{device_id}/commands", json=command).status_code == 202
    for client in (viewer, operator):
        assert client.post(f"/api/devices/{device_id}/credential").status_code == 403
        assert client.delete(f"/api/devices/{device_id}").status_code == 403
        assert client.post("/api/devices/import", content="id\nx\n").status_code == 403
    assert admin.delete(f"/api/devices/{device_id}").status_code == 204


# -- devices --------------------------------------------------------------------------------


def test_devices_create_conflict_bad_input_get_list_delete(
    admin: httpx.Client, viewer: httpx.Client, device_prefix: str
) -> None:
    device_id = f"{device_prefix}a"
    created = admin.post("/api/devices", json={"id": device_id})
    assert created.status_code == 201
    assert created.json()["id"] == device_id and len(created.json()["credential"]) >= 32

    again = admin.post("/api/devices", json={"id": device_id})
    assert again.status_code == 409
    assert again.json() == {"detail": f"device {device_id!r} is already registered"}

    for body, needle in [
        ({"id": "has space"}, "space"),
        ({"id": "a/b"}, "'/'"),
        ({"id": ""}, "id"),
        ({}, "id"),
        ({"id": "x", "colour": "red"}, "colour"),
    ]:
        bad = admin.post("/api/devices", json=body)
        assert bad.status_code == 422, body
        assert needle in bad.json()["detail"], bad.json()
        assert isinstance(bad.json()["detail"], str)
    not_json = admin.post("/api/devices", content="{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and isinstance(not_json.json()["detail"], str)

    detail = _device(viewer, device_id)
    assert detail["online"] is False and detail["hub"] is None
    assert detail["state"] == {} and detail["last_values"] == {}

    _create(admin, f"{device_prefix}b")
    page = viewer.get("/api/devices", params={"prefix": device_prefix}).json()
    assert [d["id"] for d in page["items"]] == [device_id, f"{device_prefix}b"]
    assert page["total"] == 2
    assert set(page["items"][0]) == {"id", "online", "last_seen", "transport", "hub"}
    second = viewer.get("/api/devices", params={"prefix": device_prefix, "limit": 1, "offset": 1})
    assert [d["id"] for d in second.json()["items"]] == [f"{device_prefix}b"]
    online = viewer.get("/api/devices", params={"prefix": device_prefix, "online": "true"})
    assert online.json()["items"] == []
    offline = viewer.get("/api/devices", params={"prefix": device_prefix, "online": "false"})
    assert offline.json()["total"] == 2
    assert viewer.get("/api/devices", params={"limit": 0}).status_code == 422

    assert admin.delete(f"/api/devices/{device_id}").status_code == 204
    gone = viewer.get(f"/api/devices/{device_id}")
    assert gone.status_code == 404 and gone.json() == {"detail": f"no device {device_id!r}"}
    assert admin.delete(f"/api/devices/{device_id}").status_code == 404


def test_csv_import_creates_the_good_ids_and_reports_the_bad(
    admin: httpx.Client, device_prefix: str
) -> None:
    existing = f"{device_prefix}old"
    _create(admin, existing)
    body = f"name,id\nx,{device_prefix}1\ny,{device_prefix}2\nz,bad id\nw,{existing}\n"
    answer = admin.post("/api/devices/import", content=body, headers={"Content-Type": "text/csv"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [c["id"] for c in result["created"]] == [f"{device_prefix}1", f"{device_prefix}2"]
    assert all(len(c["credential"]) >= 32 for c in result["created"])
    assert len(result["errors"]) == 2
    assert any("bad id" in e for e in result["errors"])
    assert any("already registered" in e for e in result["errors"])
    empty = admin.post("/api/devices/import", content="", headers={"Content-Type": "text/csv"})
    assert empty.status_code == 422 and "no device ids" in empty.json()["detail"]


def test_openapi_schema_lists_every_endpoint(console: ConsoleProcess) -> None:
    schema = httpx.get(f"{console.url}/api/openapi.json", timeout=30).json()
    paths = schema["paths"]
    expected = {
        "/api/devices": {"get", "post"},
        "/api/devices/import": {"post"},
        "/api/devices/{device_id}": {"get", "delete"},
        "/api/devices/{device_id}/credential": {"post"},
        "/api/devices/{device_id}/telemetry": {"get"},
        "/api/devices/{device_id}/commands": {"post"},
        "/api/commands/{command_id}": {"get"},
        "/api/hubs": {"get"},
        "/api/events": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
    assert "Command" in schema["components"]["schemas"]


# -- with a hub, a worker and devices -------------------------------------------------------


class EventReader:
    """Reads /api/events in a thread and keeps every event."""

    def __init__(self, url: str, token: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, token), daemon=True)
        self._thread.start()

    def _run(self, url: str, token: str) -> None:
        # The console stopping ends the stream with an error; that is the end.
        with contextlib.suppress(httpx.HTTPError):
            self._read(url, token)

    def _read(self, url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.stream("GET", f"{url}/api/events", headers=headers, timeout=None) as stream:
            kind = ""
            for line in stream.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    self.events.append((kind, json.loads(line[6:])))

    def seen(self, kind: str, **fields: Any) -> bool:
        return any(
            k == kind and all(data.get(f) == v for f, v in fields.items())
            for k, data in list(self.events)
        )

    def stop(self) -> None:
        self._stop.set()


def test_presence_telemetry_commands_hubs_and_events_with_a_running_hub(
    worker: Worker,
    running_hub: StartHub,
    simulated_devices: StartDevice,
    console: ConsoleProcess,
    tokens: dict[str, str],
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    device_prefix: str,
) -> None:
    events = EventReader(console.url, tokens["viewer"])
    hub = running_hub(hub_heartbeat_s=0.5)
    device_id = f"{device_prefix}live"
    credential = _create(admin, device_id)
    simulated_devices("tcp", hub.tcp_port, device_id, credential, messages=None, rate=5)

    assert wait_until(lambda: _device(viewer, device_id)["online"], timeout=30)
    detail = _device(viewer, device_id)
    assert detail["hub"] == hub.app.downlink.hub_id and detail["transport"] == "tcp"
    listed = viewer.get("/api/devices", params={"prefix": device_prefix, "online": "true"})
    assert [d["id"] for d in listed.json()["items"]] == [device_id]

    def rows() -> list[dict[str, Any]]:
        answer = viewer.get(f"/api/devices/{device_id}/telemetry", params={"limit": 5})
        return list(answer.json()["items"])

    assert wait_until(lambda: len(rows()) == 5, timeout=60)
    newest = rows()
    assert newest[0]["received_at"] >= newest[1]["received_at"] >= newest[2]["received_at"]
    assert wait_until(lambda: _device(viewer, device_id)["last_values"] != {}, timeout=30)
    since = newest[1]["received_at"]
    later = viewer.get(f"/api/devices/{device_id}/telemetry", params={"since": since}).json()
    assert all(r["received_at"] > since for r in later["items"]) and later["items"]
    until = viewer.get(f"/api/devices/{device_id}/telemetry", params={"until": since}).json()
    assert all(r["received_at"] <= since for r in until["items"]) and until["items"]
    csv_answer = viewer.get(
        f"/api/devices/{device_id}/telemetry", params={"format": "csv", "limit": 5}
    )
    assert csv_answer.headers["content-type"].startswith("text/csv")
    lines = csv_answer.text.strip().splitlines()
    assert lines[0].startswith("received_at,device_time,seq") and len(lines) == 6
    bad_time = viewer.get(f"/api/devices/{device_id}/telemetry", params={"since": "yesterday"})
    assert bad_time.status_code == 422 and "since" in bad_time.json()["detail"]

    sent = operator.post(f"/api/devices/{device_id}/commands", json={"name": "ping", "ttl": 30})
    assert sent.status_code == 202
    command_id = sent.json()["id"]

    def command() -> dict[str, Any]:
        return dict(viewer.get(f"/api/commands/{command_id}").json())

    assert wait_until(lambda: command()["status"] == "succeeded", timeout=60), command()
    outcome = command()
    assert outcome["device"] == device_id and outcome["name"] == "ping"
    assert outcome["result"]["pong"] is True and outcome["error"] is None
    assert viewer.get("/api/commands/nope").status_code == 404
    bad_command = operator.post(f"/api/devices/{device_id}/commands", json={"name": "", "ttl": 0})
    assert bad_command.status_code == 422
    assert operator.post("/api/devices/nobody/commands", json={"name": "ping"}).status_code == 404

    hubs = viewer.get("/api/hubs").json()
    mine = next(h for h in hubs if h["id"] == hub.app.downlink.hub_id)
    assert mine["alive"] is True and mine["devices_connected"]["tcp"] >= 1
    assert any(
        x["name"].startswith("tcp/") and x["port"] == hub.tcp_port for x in mine["listeners"]
    )
    assert mine["spool_messages"] == 0 and mine["broker_connected"] is True

    assert wait_until(lambda: events.seen("presence", device=device_id, online=True), timeout=30)
    assert wait_until(lambda: events.seen("telemetry", device=device_id), timeout=30)
    assert wait_until(lambda: events.seen("command", id=command_id, status="succeeded"), timeout=30)
    events.stop()

    audit = [e for e in _audit(console) if e["target"] == device_id]
    assert {e["action"] for e in audit} >= {"device.add", "command.send"}


def _audit(console: ConsoleProcess) -> list[dict[str, Any]]:
    from hub import audit
    from hub.storage import make_engine

    engine = make_engine(console.settings.effective_database_url)
    try:
        return [
            {"action": e.action, "target": e.target, "actor": e.actor}
            for e in audit.recent(engine, 500)
        ]
    finally:
        engine.dispose()


def _mqtt_connect(port: int, device_id: str, credential: str) -> tuple[mqtt.Client, int]:
    """Connect with paho; returns the client and the CONNACK reason (0: accepted)."""
    result: dict[str, int] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-probe")
    client.username_pw_set(device_id, credential)

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["rc"] = int(reason.value)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(30)
    return client, result.get("rc", -1)


def test_rekeying_disconnects_a_connected_device_on_both_transports(
    running_hub: StartHub,
    console: ConsoleProcess,
    admin: httpx.Client,
    viewer: httpx.Client,
    device_prefix: str,
) -> None:
    hub = running_hub(mqtt_enabled=True, hub_heartbeat_s=0.5)
    assert wait_until(
        lambda: any(h["id"] == hub.app.downlink.hub_id for h in viewer.get("/api/hubs").json()),
        timeout=30,
    )
    tcp_id, mqtt_id = f"{device_prefix}tcp", f"{device_prefix}mqtt"
    tcp_old, mqtt_old = _create(admin, tcp_id), _create(admin, mqtt_id)

    tcp = RawDevice(hub.tcp_port)
    assert isinstance(tcp.hello(tcp_id, tcp_old), Ack)
    disconnected = threading.Event()
    client, rc = _mqtt_connect(hub.mqtt_port, mqtt_id, mqtt_old)
    assert rc == 0
    client.on_disconnect = lambda *_: disconnected.set()
    assert wait_until(lambda: hub.app.mqtt.connected_devices == 1, timeout=10)

    tcp_new = admin.post(f"/api/devices/{tcp_id}/credential")
    mqtt_new = admin.post(f"/api/devices/{mqtt_id}/credential")
    assert tcp_new.status_code == 200 and mqtt_new.status_code == 200
    assert tcp_new.json()["credential"] != tcp_old

    # Both connections made with the old credentials are dropped by the hub.
    assert isinstance(tcp.next_event(timeout=30), ConnectionClosed)
    assert disconnected.wait(30)
    client.loop_stop()
    assert wait_until(lambda: hub.app.mqtt.connected_devices == 0, timeout=10)

    # The old credentials no longer get in; the new ones do.
    again = RawDevice(hub.tcp_port)
    assert isinstance(again.hello(tcp_id, tcp_old), Nak)
    fresh = RawDevice(hub.tcp_port)
    assert isinstance(fresh.hello(tcp_id, tcp_new.json()["credential"]), Ack)
    refused, rc_old = _mqtt_connect(hub.mqtt_port, mqtt_id, mqtt_old)
    assert rc_old != 0
    accepted, rc_new = _mqtt_connect(hub.mqtt_port, mqtt_id, mqtt_new.json()["credential"])
    assert rc_new == 0
    for c in (refused, accepted):
        c.disconnect()
        c.loop_stop()
    for d in (tcp, again, fresh):
        d.close()
    assert "device.rekey" in {e["action"] for e in _audit(console) if e["target"] == tcp_id}


def test_the_console_works_with_no_hub_and_commands_wait_for_one(
    worker: Worker,
    running_hub: StartHub,
    simulated_devices: StartDevice,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    device_prefix: str,
) -> None:
    device_id = f"{device_prefix}later"
    credential = _create(admin, device_id)
    assert _device(viewer, device_id)["online"] is False
    sent = operator.post(f"/api/devices/{device_id}/commands", json={"name": "ping", "ttl": 120})
    assert sent.status_code == 202
    command_id = sent.json()["id"]
    time.sleep(2)
    assert viewer.get(f"/api/commands/{command_id}").json()["status"] == "pending"

    hub = running_hub(hub_heartbeat_s=0.5)
    simulated_devices("tcp", hub.tcp_port, device_id, credential)
    assert wait_until(
        lambda: viewer.get(f"/api/commands/{command_id}").json()["status"] == "succeeded",
        timeout=60,
    )


def test_the_hub_keeps_acknowledging_devices_with_the_console_stopped(
    worker: Worker,
    running_hub: StartHub,
    console_settings: Settings,
    tmp_path: Path,
    device_prefix: str,
    provision: Callable[[list[str]], dict[str, str]],
) -> None:
    own = ConsoleProcess(console_settings, tmp_path / "console.log")
    own.stop()
    hub = running_hub(hub_heartbeat_s=0.5)
    ((device_id, credential),) = provision([f"{device_prefix}alone"]).items()
    device = RawDevice(hub.tcp_port)
    assert isinstance(device.hello(device_id, credential), Ack)
    for seq in range(1, 21):
        device.telemetry(seq, {"t": seq})
    assert device.acks_until(20) >= set(range(1, 21))
    device.close()


def test_user_and_token_commands(console_settings: Settings) -> None:
    name = f"u{time.monotonic_ns()}"
    added = cli(console_settings, "users", "add", name, "--role", "operator", "--json")
    assert added.returncode == 0, added.stderr
    password = json.loads(added.stdout)["password"]
    assert len(password) >= 16
    listed = json.loads(cli(console_settings, "users", "list", "--json").stdout)
    assert {"name": name, "role": "operator"}.items() <= next(
        u for u in listed if u["name"] == name
    ).items()
    twice = cli(console_settings, "users", "add", name, "--role", "viewer")
    assert twice.returncode == 1 and "already exists" in twice.stderr
    bad_role = cli(console_settings, "users", "add", "x", "--role", "root")
    assert bad_role.returncode == 2
    assert cli(console_settings, "users", "remove", name).returncode == 0
    assert cli(console_settings, "users", "remove", name).returncode == 1
    token = cli(console_settings, "tokens", "add", name, "--role", "viewer")
    assert token.returncode == 0 and "hubt_" in token.stdout
    assert name in cli(console_settings, "tokens", "list").stdout
    make_user(console_settings, f"{name}-2", "viewer")

    # Devices added and removed on the command line are in the audit log too.
    from hub import audit
    from hub.storage import make_engine

    assert cli(console_settings, "devices", "add", f"{name}-dev").returncode == 0
    assert cli(console_settings, "devices", "remove", f"{name}-dev").returncode == 0
    engine = make_engine(console_settings.effective_database_url)
    try:
        entries = [
            (e.actor, e.action) for e in audit.recent(engine, 500) if e.target.startswith(name)
        ]
    finally:
        engine.dispose()
    assert ("cli", "device.add") in entries and ("cli", "device.remove") in entries
    assert ("cli", "user.add") in entries and ("cli", "token.add") in entries


def _dead_letter(console: ConsoleProcess, device_id: str, seq: int) -> str:
    """A dead letter as a worker records it when the database refused a telemetry batch."""
    from hub import dead_letters
    from hub.envelope import Envelope, Kind
    from hub.storage import make_engine

    envelope = Envelope(
        device_id=device_id,
        kind=Kind.TELEMETRY,
        payload={"t": seq},
        transport="tcp",
        protocol="native",
        seq=seq,
    ).to_dict()
    engine = make_engine(console.settings.effective_database_url)
    try:
        return dead_letters.record(
            engine,
            dead_letters.NewDeadLetter(
                source="tasks.ingest.telemetry",
                reason=dead_letters.STORE_FAILED,
                error="the database refused the batch",
                envelope=envelope,
                task_name="tasks.ingest.telemetry",
                task_args=[[envelope]],
            ),
        )
    finally:
        engine.dispose()


def test_dead_letters_list_show_replay_and_discard(
    worker: Worker,
    console: ConsoleProcess,
    viewer: httpx.Client,
    operator: httpx.Client,
    device_prefix: str,
) -> None:
    device_id = f"{device_prefix}dl"
    first, second = _dead_letter(console, device_id, 1), _dead_letter(console, device_id, 2)

    page = viewer.get("/api/dead-letters").json()
    mine = {d["id"]: d for d in page["items"] if d["device_id"] == device_id}
    assert set(mine) == {first, second}
    assert mine[first]["reason"] == "store_failed" and mine[first]["replayable"] is True
    assert page["counts"]["dead"] >= 2
    shown = viewer.get(f"/api/dead-letters/{first}").json()
    assert '"t":1' in shown["payload"].replace(" ", "")
    assert viewer.post(f"/api/dead-letters/{first}/replay").status_code == 403
    assert viewer.delete(f"/api/dead-letters/{first}").status_code == 403

    replayed = operator.post(f"/api/dead-letters/{first}/replay")
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["task_id"]
    again = operator.post(f"/api/dead-letters/{first}/replay")
    assert again.status_code == 409 and "replayed, not dead" in again.json()["detail"]
    from hub.storage import count_rows, make_engine

    engine = make_engine(console.settings.effective_database_url)
    try:
        assert wait_until(lambda: count_rows(engine, device_prefix=device_id) == 1, timeout=60)
    finally:
        engine.dispose()

    assert operator.delete(f"/api/dead-letters/{second}").status_code == 204
    assert viewer.get(f"/api/dead-letters/{second}").json()["status"] == "discarded"
    assert operator.delete(f"/api/dead-letters/{second}").status_code == 409
    assert viewer.get("/api/dead-letters/nope").status_code == 404
    assert operator.post("/api/dead-letters/nope/replay").status_code == 404
    actions = {(e["action"], e["target"]) for e in _audit(console)}
    assert ("dead_letter.replay", first) in actions
    assert ("dead_letter.discard", second) in actions


def _login_form(client: httpx.Client) -> str:
    import re

    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert found is not None
    return found.group(1)


def test_browser_login_cookie_csrf_and_slowed_down_failures(
    console: ConsoleProcess, console_settings: Settings, device_prefix: str
) -> None:
    name = f"admin-{time.monotonic_ns()}"
    password = make_user(console_settings, name, "admin")
    with httpx.Client(base_url=console.url, timeout=30) as browser:
        # A login without the form's token is refused.
        refused = browser.post(
            "/login", data={"username": name, "password": password, "csrf_token": "forged"}
        )
        assert refused.status_code == 403
        answer = browser.post(
            "/login",
            data={"username": name, "password": password, "csrf_token": _login_form(browser)},
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/devices"
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=" in cookie
        page = browser.get("/devices")
        assert page.status_code == 200
        csrf = page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]

        # With the cookie, a change needs the session's CSRF token.
        body = {"id": f"{device_prefix}c"}
        assert browser.post("/api/devices", json=body).status_code == 403
        forged = browser.post("/api/devices", json=body, headers={"X-CSRF-Token": "x"})
        assert forged.status_code == 403 and "CSRF token" in forged.json()["detail"]
        made = browser.post("/api/devices", json=body, headers={"X-CSRF-Token": csrf})
        assert made.status_code == 201
        no_field = browser.post("/provisioning/add", data={"device_id": f"{device_prefix}d"})
        assert no_field.status_code == 403
        with_field = browser.post(
            "/provisioning/add", data={"device_id": f"{device_prefix}d", "csrf_token": csrf}
        )
        assert with_field.status_code == 200 and "shown only this once" in with_field.text

        out = browser.post("/logout", data={"csrf_token": csrf})
        assert out.status_code == 303
        assert browser.get("/api/devices").status_code == 401

    with httpx.Client(base_url=console.url, timeout=30) as guesser:
        codes = []
        for _ in range(7):
            wrong = guesser.post(
                "/login",
                data={"username": name, "password": "guess", "csrf_token": _login_form(guesser)},
            )
            codes.append(wrong.status_code)
        assert codes[:5] == [401] * 5
        assert 429 in codes[5:]
        slowed = guesser.post(
            "/login",
            data={"username": name, "password": password, "csrf_token": _login_form(guesser)},
        )
        assert slowed.status_code == 429 and "Too many failed logins" in slowed.text


def test_a_stopped_hub_leaves_no_heartbeat_and_its_devices_go_offline(
    hub_settings_factory: Callable[..., Settings],
    admin: httpx.Client,
    viewer: httpx.Client,
    device_prefix: str,
) -> None:
    hub = HubThread(hub_settings_factory(hub_heartbeat_s=0.3))
    hub_id = hub.app.downlink.hub_id
    try:
        device_id = f"{device_prefix}gone"
        device = RawDevice(hub.tcp_port)
        assert isinstance(device.hello(device_id, _create(admin, device_id)), Ack)
        assert wait_until(lambda: _device(viewer, device_id)["online"], timeout=30)
        assert any(h["id"] == hub_id for h in viewer.get("/api/hubs").json())
    finally:
        hub.stop()
    assert all(h["id"] != hub_id for h in viewer.get("/api/hubs").json())
    assert _device(viewer, device_id)["online"] is False
    device.close()
