"""Stopping with a full spool and RabbitMQ away: the messages that could not be made
durable stay unacknowledged (the devices send them again), and the stop says so in
one line instead of one "Future exception was never retrieved" per message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.harness import (
    Fleet,
    FleetOptions,
    HubOptions,
    HubProcess,
    provision,
    wait_for,
)
from tests.support.services import free_port

pytestmark = pytest.mark.integration


def test_stopping_with_a_full_spool_logs_one_summary_line(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    credentials = provision(database_url, ["rel-stopfull-1", "rel-stopfull-2"])
    mqtt = provision(database_url, ["rel-stopfull-3", "rel-stopfull-4"])
    # Nothing listens there: RabbitMQ is away for the whole test.
    away = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    hub = HubProcess(
        HubOptions(
            data_dir=tmp_path / "hub",
            database_url=database_url,
            broker_url=away,
            handlers=(),
            env={"HUB_SPOOL_MAX_MESSAGES": "20"},
        )
    )
    fleet = Fleet(
        FleetOptions(
            tcp_port=hub.options.tcp_port,
            mqtt_port=hub.options.mqtt_port,
            tcp=credentials,
            mqtt=mqtt,
            rate=50,
            drain_timeout_s=1.0,
        )
    )
    try:
        hub.start()
        fleet.start()
        assert wait_for(lambda: hub.metric("hub_spool_messages") > 0, 60)
        # Spool full: what arrives now waits, unacknowledged.
        assert wait_for(lambda: fleet.outstanding() >= 20, 60), (fleet.outstanding(), fleet.stats)
        assert hub.terminate() == 0
    finally:
        hub.close()
        fleet.stop(timeout=60)
    log = hub.log_text()
    assert "Future exception was never retrieved" not in log
    summary = [line for line in log.splitlines() if "not made durable" in line]
    assert len(summary) == 1, log[-3000:]
