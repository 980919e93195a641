"""Two hubs behind HAProxy on one PostgreSQL database and one RabbitMQ vhost, with
the configuration of docs/haproxy.cfg as is (only its ports set).

Both hubs start at the same moment on a fresh database; TCP (native) and MQTT
(QoS 1) devices stream through the balancer; one hub is SIGKILLed mid-stream.
Its devices reconnect through HAProxy to the other hub, nothing acknowledged
is lost or stored twice (`compare()`), and a command sent to a device that
moved reaches it there. A third hub with a taken `hub_id` is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hub.storage import DeviceConnection, make_engine
from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubOptions,
    HubProcess,
    WorkerProcess,
    assert_nothing_lost,
    conclude,
    measure_recovery,
    provision,
    wait_for,
)
from tests.support.postgres import postgres_database
from tests.support.processes import ROOT, make_test_settings
from tests.support.services import free_port

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

HAPROXY_CONFIG = ROOT / "docs" / "haproxy.cfg"
INSTALL_HAPROXY = (
    "haproxy is not on PATH; the scale-out scenario runs hubs behind it "
    "(Debian: `apt-get install -y haproxy`)"
)
DEVICES_PER_TRANSPORT = 50


class HaproxyProcess:
    """`haproxy -db -f docs/haproxy.cfg` in the foreground, its ports from the environment."""

    def __init__(self, hubs: list[HubOptions], log_path: Path) -> None:
        if shutil.which("haproxy") is None:
            pytest.fail(INSTALL_HAPROXY, pytrace=False)
        self.tcp_port = free_port()
        self.mqtt_port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAPROXY_", "HUB"))}
        env.update(
            HAPROXY_BIND="127.0.0.1",
            HAPROXY_TCP_PORT=str(self.tcp_port),
            HAPROXY_MQTT_PORT=str(self.mqtt_port),
        )
        for n, hub in enumerate(hubs, start=1):
            env.update(
                {
                    f"HUB{n}_ADDR": "127.0.0.1",
                    f"HUB{n}_TCP_PORT": str(hub.tcp_port),
                    f"HUB{n}_MQTT_PORT": str(hub.mqtt_port),
                    f"HUB{n}_HTTP_PORT": str(hub.http_port),
                }
            )
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(HAPROXY_CONFIG)], env=self.env, capture_output=True
        )
        assert check.returncode == 0, f"docs/haproxy.cfg is invalid: {check.stderr.decode()}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(HAPROXY_CONFIG)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def _holders(database_url: str) -> dict[str, str]:
    """Device id -> id of the hub that holds its connection now."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(DeviceConnection.device_id, DeviceConnection.hub_id))
            return {r.device_id: r.hub_id for r in rows}
    finally:
        engine.dispose()


def test_two_hubs_behind_haproxy_one_sigkilled_mid_stream(
    tmp_path: Path,
    postgres_url: str,
    shared_rabbit_url: str,
    workers: Callable[..., WorkerProcess],
    fleets: Callable[[FleetOptions], Fleet],
) -> None:
    database_url = postgres_url
    options = [
        HubOptions(
            data_dir=tmp_path / f"hub-{name}",
            database_url=database_url,
            broker_url=shared_rabbit_url,
            env={"HUB_HUB_ID": name, "HUB_HUB_HEARTBEAT_S": "1"},
        )
        for name in ("hub-a", "hub-b")
    ]
    hubs = [HubProcess(o) for o in options]
    balancer = HaproxyProcess(options, tmp_path / "haproxy.log")
    extra: list[HubProcess] = []
    try:
        # Both hubs at the same moment on a fresh database: migrations and
        # registration must not trip over each other.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda h: h.start(), hubs))
        workers(shared_rabbit_url, database_url, concurrency=2)
        balancer.start()
        _scenario(tmp_path, database_url, shared_rabbit_url, hubs, balancer, fleets, extra)
    finally:
        balancer.close()
        for hub in [*hubs, *extra]:
            hub.close()


def _scenario(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    hubs: list[HubProcess],
    balancer: HaproxyProcess,
    fleets: Callable[[FleetOptions], Fleet],
    extra: list[HubProcess],
) -> None:
    first, second = hubs
    # A hub id that a running hub uses is refused at start, in one line.
    twin = HubProcess(same_id_elsewhere(first.options, tmp_path / "hub-twin"))
    extra.append(twin)
    with pytest.raises(RuntimeError, match="hub_id 'hub-a' is in use by a running hub"):
        twin.start(timeout=60)

    tcp_ids = [f"rel-scale-tcp-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    mqtt_ids = [f"rel-scale-mqtt-{n}" for n in range(1, DEVICES_PER_TRANSPORT + 1)]
    credentials = provision(database_url, tcp_ids + mqtt_ids)
    fleet = fleets(
        FleetOptions(
            tcp_port=balancer.tcp_port,
            mqtt_port=balancer.mqtt_port,
            tcp={d: credentials[d] for d in tcp_ids},
            mqtt={d: credentials[d] for d in mqtt_ids},
            rate=5.0,
        )
    )
    everyone = set(tcp_ids + mqtt_ids)
    # 120 s: on a loaded machine the balancer's first health checks and the
    # devices' reconnect backoff take a while; the logs say why if not.
    assert wait_for(lambda: set(_holders(database_url)) >= everyone, 120), (
        f"not every device connected through the balancer: {_holders(database_url)}\n"
        + _log_tails(tmp_path)
    )
    assert fleet.wait_acks(300, 90), "the fleet was not acknowledged before the fault"
    held = _holders(database_url)
    moved = sorted(d for d, hub_id in held.items() if hub_id == "hub-a")
    assert {"hub-a", "hub-b"} <= set(held.values()), f"the balancer used one hub only: {held}"
    assert any(d in tcp_ids for d in moved) and any(d in mqtt_ids for d in moved), (
        f"hub-a held devices of one transport only: {moved}"
    )

    first.kill()
    killed_at = time.monotonic()
    # Every device of the killed hub comes back through HAProxy on the other one.
    assert wait_for(
        lambda: all(_holders(database_url).get(d) == "hub-b" for d in moved), 60, 0.5
    ), f"devices did not move to hub-b: {_holders(database_url)}"
    recovery = measure_recovery(fleet, database_url, killed_at, timeout=120)

    # A command to a device that moved reaches it on the hub that holds it now.
    import tasks
    import tasks.application

    previous = tasks.application.context().settings
    tasks.application.configure(
        make_test_settings(tmp_path / "sender", broker_url=broker_url, database_url=database_url)
    )
    try:
        # Sorted, the first is an MQTT device and the last a TCP one.
        for device_id in (moved[0], moved[-1]):
            reply: Any = tasks.send_command(device_id, "ping", ttl=60).get(timeout=60)
            assert reply["pong"] is True and reply["device"] == device_id
    finally:
        tasks.application.configure(previous)

    # The stream goes on through the survivor before the books are closed.
    assert fleet.wait_acks(500, 60), "acknowledgements stopped after the fault"
    results = conclude(
        "two hubs behind HAProxy, one SIGKILLed", fleet, database_url, recovery_s=recovery
    )
    assert_nothing_lost(results, ("tcp", "mqtt"))
    assert second.running, "the surviving hub stopped"


def _log_tails(tmp_path: Path, chars: int = 1500) -> str:
    """The end of every log of the scenario (hubs, worker, HAProxy), for a failure."""
    return "\n".join(
        f"--- {log.name}:\n{log.read_text(errors='replace')[-chars:]}"
        for log in sorted(tmp_path.glob("*.log"))
    )


def same_id_elsewhere(options: HubOptions, data_dir: Path) -> HubOptions:
    """Another hub with the same `hub_id`, on ports and a data folder of its own."""
    return HubOptions(
        data_dir=data_dir,
        database_url=options.database_url,
        broker_url=options.broker_url,
        env=dict(options.env),
    )
