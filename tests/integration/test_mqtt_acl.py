"""The ACL file (`mqtt_acl_file`) on the real embedded broker, with paho clients.

The broker runs in process with a dispatcher double (as in
test_mqtt_embedded.py); the last test sends SIGHUP to a real `hub run`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.errors import ConfigError
from tests.integration.test_embedded import _env
from tests.integration.test_mqtt_embedded import WAIT_S, Broker, Client, acked, telemetry
from tests.support.processes import ROOT, wait_until
from tests.support.services import free_port

Make = Callable[..., Client]

ANONYMOUS_ACL = """\
# The paho interoperability suite's broker: everything but test/nosubscribe.
topic readwrite #
topic deny test/nosubscribe
"""


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
def acl_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(acl: str, **overrides: Any) -> Broker:
        path = tmp_path / f"acl-{len(started)}"
        path.write_text(acl)
        b = Broker(tmp_path / f"hub{len(started)}", mqtt_acl_file=path, **overrides)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.close()


def anonymous(b: Broker, make: Make, client_id: str) -> Client:
    c = make(b.port, client_id)
    assert not c.connect().is_failure
    return c


def received(c: Client, settle_s: float = 0.3) -> list[str]:
    time.sleep(settle_s)
    topics = []
    while not c.messages.empty():
        topics.append(c.messages.get_nowait().topic)
    return topics


def test_a_denied_subscribe_gets_0x80_and_the_rest_are_granted(
    acl_broker: Callable[..., Broker], clients: Make
) -> None:
    b = acl_broker(ANONYMOUS_ACL, mqtt_allow_anonymous=True)
    c = anonymous(b, clients, "suite")
    (refused,) = c.subscribe("test/nosubscribe")
    assert refused.is_failure and refused.value == 0x80
    for allowed in ("TopicA/+", "+/C", "#", "/#", "TopicA/#"):
        assert not c.subscribe(allowed, qos=1)[0].is_failure, allowed
    assert b.counter("hub_acl_refusals_total", action="subscribe") == 1

    c.publish("TopicA/B", b"hello", qos=1)
    assert c.messages.get(timeout=WAIT_S).topic == "TopicA/B"
    # Publishing the denied topic is refused too (deny covers read and write).
    assert acked(c.publish("test/nosubscribe", b"x", qos=1))
    assert "test/nosubscribe" not in received(c)
    assert b.counter("hub_acl_refusals_total", action="publish") == 1


def test_a_deny_within_a_granted_filter_withholds_those_topics(
    acl_broker: Callable[..., Broker], clients: Make
) -> None:
    b = acl_broker("topic readwrite #\ntopic deny secret/#", mqtt_allow_anonymous=True)
    sub, pub = anonymous(b, clients, "sub"), anonymous(b, clients, "pub")
    assert not sub.subscribe("#")[0].is_failure
    assert sub.subscribe("secret/#")[0].is_failure
    assert acked(pub.publish("secret/x", b"0"))  # refused: deny covers write too
    pub.publish("open/a", b"1")
    assert sub.messages.get(timeout=WAIT_S).topic == "open/a"
    assert received(sub) == []


def test_read_and_write_rules_and_a_pattern(
    acl_broker: Callable[..., Broker], clients: Make
) -> None:
    acl = "topic read news/#\ntopic write upload/#\npattern readwrite clients/%c/#\n"
    b = acl_broker(acl, mqtt_allow_anonymous=True)
    alice, bob = anonymous(b, clients, "alice"), anonymous(b, clients, "bob")

    assert not alice.subscribe("clients/alice/#")[0].is_failure
    assert alice.subscribe("clients/bob/#")[0].is_failure
    assert alice.subscribe("clients/+/#")[0].is_failure
    assert alice.subscribe("upload/#")[0].is_failure  # write only
    assert not bob.subscribe("news/#")[0].is_failure
    assert alice.subscribe("#")[0].is_failure  # no grant covers all of it

    # bob may not write into alice's pattern topics; alice may.
    assert acked(bob.publish("clients/alice/inbox", b"from bob"))
    assert acked(alice.publish("clients/alice/inbox", b"from alice"))
    message = alice.messages.get(timeout=WAIT_S)
    assert message.payload == b"from alice"
    assert received(alice) == []
    # news is read only: nobody delivers what an anonymous client writes there.
    assert acked(alice.publish("news/today", b"x"))
    assert received(bob) == []
    assert b.counter("hub_acl_refusals_total", action="publish") == 2


def test_a_device_cannot_be_widened_by_the_file(
    acl_broker: Callable[..., Broker], clients: Make
) -> None:
    acl = "topic readwrite #\nuser dev-1\ntopic readwrite #\npattern readwrite #\n"
    b = acl_broker(acl, mqtt_allow_anonymous=True)
    credential = b.provision("dev-1")
    dev = clients(b.port, "dev-1", "dev-1", credential)
    assert not dev.connect().is_failure
    monitor = anonymous(b, clients, "monitor")
    assert not monitor.subscribe("#")[0].is_failure

    for refused in ("#", "devices/dev-2/commands", "elsewhere/x"):
        assert dev.subscribe(refused)[0].is_failure, refused
    assert not dev.subscribe("devices/dev-1/commands")[0].is_failure
    assert acked(dev.publish("devices/dev-2/telemetry", telemetry(1)))
    assert acked(dev.publish("elsewhere/x", b"{}"))
    assert acked(dev.publish("devices/dev-1/telemetry", telemetry(2)))
    assert received(monitor, 0.5) == ["devices/dev-1/telemetry"]
    assert [e.device_id for e in b.dispatcher.data()] == ["dev-1"]


def test_the_file_may_narrow_a_device(acl_broker: Callable[..., Broker], clients: Make) -> None:
    # dev-1 has a section: only what it grants. dev-2 has none: only the denies.
    acl = "user dev-1\ntopic write devices/dev-1/telemetry\npattern deny devices/%u/events\n"
    b = acl_broker(acl)
    one = clients(b.port, "dev-1", "dev-1", b.provision("dev-1"))
    two = clients(b.port, "dev-2", "dev-2", b.provision("dev-2"))
    assert not one.connect().is_failure and not two.connect().is_failure

    assert one.subscribe("devices/dev-1/commands")[0].is_failure  # no read grant
    assert not two.subscribe("devices/dev-2/commands")[0].is_failure
    for c, device_id in ((one, "dev-1"), (two, "dev-2")):
        assert acked(c.publish(f"devices/{device_id}/telemetry", telemetry(1)))
        assert acked(c.publish(f"devices/{device_id}/events", telemetry(2)))
        assert acked(c.publish(f"devices/{device_id}/state", telemetry(3)))
    assert wait_until(lambda: len(b.dispatcher.data()) >= 3, timeout=WAIT_S)
    time.sleep(0.3)
    bridged = sorted((e.device_id, e.kind.value) for e in b.dispatcher.data())
    assert bridged == [("dev-1", "telemetry"), ("dev-2", "state"), ("dev-2", "telemetry")]
    # Each refusal counted once, though the tap and amqtt both ask.
    assert b.counter("hub_acl_refusals_total", action="publish") == 3
    assert b.counter("hub_acl_refusals_total", action="subscribe") == 1


def test_a_reload_takes_effect_without_disconnecting_anyone(
    acl_broker: Callable[..., Broker], clients: Make, tmp_path: Path
) -> None:
    b = acl_broker("topic readwrite #", mqtt_allow_anonymous=True)
    path = tmp_path / "acl-0"
    sub, pub = anonymous(b, clients, "sub"), anonymous(b, clients, "pub")
    assert not sub.subscribe("room/#")[0].is_failure
    pub.publish("room/a", b"before")
    assert sub.messages.get(timeout=WAIT_S).payload == b"before"

    path.write_text("topic readwrite #\ntopic deny room/a\n")
    b.call_soon(b.mqtt.reload_access)
    assert acked(pub.publish("room/a", b"after"))
    pub.publish("room/b", b"other")
    assert sub.messages.get(timeout=WAIT_S).payload == b"other"
    assert received(sub) == []
    assert sub.subscribe("room/a")[0].is_failure
    # A file that no longer parses keeps the rules in force.
    path.write_text("topic readwrite #\nnonsense\n")
    b.call_soon(b.mqtt.reload_access)
    assert sub.subscribe("room/a")[0].is_failure
    assert not sub.subscribe("room/c")[0].is_failure
    assert sub.client.is_connected() and pub.client.is_connected()
    assert not sub.disconnected.is_set() and not pub.disconnected.is_set()


def test_an_anonymous_will_must_be_writable(
    acl_broker: Callable[..., Broker], clients: Make
) -> None:
    b = acl_broker("topic read #\ntopic write wills/#", mqtt_allow_anonymous=True)
    bad = clients(b.port, "bad")
    bad.client.will_set("elsewhere/gone", b"x")
    assert bad.connect().value == 135  # not authorized
    good = clients(b.port, "good")
    good.client.will_set("wills/good", b"x")
    assert not good.connect().is_failure


def test_a_file_that_does_not_parse_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text("topic read a\n\ntopic read a/#/b\n")
    with pytest.raises(ConfigError, match=r"acl, line 3: topic 'a/#/b': '#' must be"):
        Broker(tmp_path / "hub", mqtt_acl_file=path)


# -- a real `hub run` ----------------------------------------------------------------


def test_sighup_reloads_the_acl_file_of_hub_run(tmp_path: Path, clients: Make) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\n")
    mqtt_port = free_port()
    env = _env(tmp_path / "data", HUB_MQTT_ALLOW_ANONYMOUS="true", HUB_MQTT_ACL_FILE=str(acl))
    log = (tmp_path / "hub.log").open("w+")
    ports = ["--tcp-port", str(free_port()), "--http-port", str(free_port())]
    ports += ["--mqtt-port", str(mqtt_port)]
    hub = subprocess.Popen(
        [sys.executable, "-m", "hubapp.cli", "run", "--no-worker", *ports],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def output() -> str:
        return (tmp_path / "hub.log").read_text()

    try:
        assert wait_until(lambda: "Press Ctrl+C" in output(), timeout=90), output()
        sub = clients(mqtt_port, "sub")
        assert not sub.connect().is_failure
        assert not sub.subscribe("room/#")[0].is_failure
        acl.write_text("topic readwrite #\ntopic deny room/secret\n")
        hub.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in output(), timeout=WAIT_S), output()
        assert sub.subscribe("room/secret")[0].is_failure
        assert not sub.subscribe("room/open")[0].is_failure
        assert hub.poll() is None and sub.client.is_connected()
        assert not sub.disconnected.is_set()
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait(10)
        log.close()
    assert hub.returncode == 0, output()
