"""The `hub_id` setting: a stable id, and a start refused while a live hub holds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub import hubs
from hub.errors import ConfigError
from hub.settings import load_settings
from hub.storage import make_engine, migrate
from hubapp.app import refuse_a_taken_hub_id


def _beat(engine: Engine, hub_id: str, pid: int, hostname: str) -> None:
    hubs.beat(
        engine,
        hubs.Heartbeat(
            hub_id, "0", "test", hostname, pid, [], 0, 0, 0, True, 5.0, datetime.now(UTC)
        ),
    )


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_a_hub_id_names_the_setting_when_invalid(tmp_path: Path) -> None:
    assert load_settings(None, data_dir=tmp_path, hub_id="hub-a.1").hub_id == "hub-a.1"
    assert load_settings(None, data_dir=tmp_path).hub_id is None
    with pytest.raises(ConfigError, match="hub_id"):
        load_settings(None, data_dir=tmp_path, hub_id="a/b")


def test_a_hub_id_held_by_a_running_hub_is_refused(engine: Engine) -> None:
    _beat(engine, "hub-a", 1, socket.gethostname())  # pid 1 always runs
    with pytest.raises(ConfigError, match=r"hub_id 'hub-a' is in use by a running hub \(pid 1"):
        refuse_a_taken_hub_id(engine, "hub-a")
    _beat(engine, "hub-b", 1, "another-host")  # cannot be checked from here: refused
    with pytest.raises(ConfigError, match="another-host"):
        refuse_a_taken_hub_id(engine, "hub-b")
    refuse_a_taken_hub_id(engine, "hub-c")
    refuse_a_taken_hub_id(engine, None)


def test_a_row_of_a_dead_process_of_this_host_does_not_count(engine: Engine) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _beat(engine, "hub-a", gone.pid, socket.gethostname())
    refuse_a_taken_hub_id(engine, "hub-a")
    _beat(engine, "hub-b", os.getpid(), socket.gethostname())  # our own pid: not a hub
    refuse_a_taken_hub_id(engine, "hub-b")
