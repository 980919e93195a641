"""Hubs and workers started at the same instant on a fresh database.

Each child process does what its role does against the database at start-up:
a hub migrates (hub/app.py `HubApp.start`) and writes its heartbeat row
(hub/hubs.py); a worker migrates from its `worker_init` handler
(tasks/application.py). They wait on a barrier file so that they all reach the
database at once. Every one must start, and the schema must be at head, once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from hub.settings import normalise_database_url
from hub.storage import MIGRATIONS_DIR, make_engine
from tests.support.postgres import postgres_database
from tests.support.processes import ROOT

pytestmark = pytest.mark.integration

#: Two hubs and two workers: the smallest mix that has each role race itself.
ROLES = ("hub", "hub", "worker", "worker")

CHILD = r"""
import os, socket, sys, time
from datetime import UTC, datetime
from pathlib import Path

role, index, url, barrier = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
os.environ["HUB_DATABASE_URL"] = url
# Everything imported before the barrier: the race is on the database alone.
from hub import hubs
from hub.storage import make_engine, migrate
if role == "worker":
    from tasks.application import _migrate_on_start

(barrier / f"ready-{index}").touch()
go = barrier / "go"
while not go.exists():
    time.sleep(0.001)

if role == "worker":
    _migrate_on_start()
else:
    migrate(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    for devices in (0, 1):  # registers, then refreshes its row as the next beat does
        hubs.beat(engine, hubs.Heartbeat(
            hub_id=f"hub-{index}", version="test", mode="test", hostname=socket.gethostname(),
            pid=os.getpid(), listeners=[{"name": "tcp"}], devices_tcp=devices, devices_mqtt=0,
            spool_messages=0, broker_connected=False, heartbeat_s=5.0, started_at=now,
        ))
    engine.dispose()
"""


@contextlib.contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    else:
        with postgres_database() as url:
            yield normalise_database_url(url)


def start_all_at_once(url: str, tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, role, str(index), url, str(barrier)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index, role in enumerate(ROLES)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("ready-*"))) < len(ROLES):
            assert time.monotonic() < deadline, "the children did not get ready in 60 s"
            assert all(c.poll() is None for c in children), "a child died before the barrier"
            time.sleep(0.01)
        (barrier / "go").touch()
        results = []
        for child in children:
            out, err = child.communicate(timeout=90)
            results.append(subprocess.CompletedProcess(child.args, child.returncode, out, err))
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_hubs_and_workers_started_at_once_on_a_fresh_database_all_start(
    kind: str, tmp_path: Path
) -> None:
    with fresh_database(kind, tmp_path) as url:
        results = start_all_at_once(url, tmp_path)
        failed = [
            f"{role} {index} exited {r.returncode}:\n{r.stderr[-3000:]}"
            for index, (role, r) in enumerate(zip(ROLES, results, strict=True))
            if r.returncode != 0
        ]
        assert not failed, "\n".join(failed)

        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
                registered = conn.execute(
                    text("SELECT hub_id, devices_tcp FROM hubs ORDER BY hub_id")
                ).all()
        finally:
            engine.dispose()
        assert [v[0] for v in versions] == [head]  # at head, and recorded once
        hub_indexes = [i for i, role in enumerate(ROLES) if role == "hub"]
        assert [tuple(r) for r in registered] == [(f"hub-{i}", 1) for i in hub_indexes]
