"""Smoke test of `python -m bench scale-out` at a tiny size, in the benchmark stage:
two configurations (one hub; two hubs behind HAProxy), each with its own vhost,
database and worker.

It checks that the command runs, prints both configurations and the ratio,
that every acknowledged message was stored exactly once in each, and that
nothing it started is left: no process, vhost, database or folder. No timed
assertions.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.postgres import POSTGRES_PORT
from bench.services import port_open
from tests.support.services import require_rabbitmq

pytestmark = [pytest.mark.integration, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]


def _processes_in(folder: str) -> list[str]:
    """Processes whose command line, environment or working directory names `folder`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            texts = [*(proc.info["cmdline"] or []), proc.cwd(), *proc.environ().values()]
            if any(folder in text for text in texts):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])}")
    return found


def _vhosts() -> set[str]:
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None, "rabbitmqctl is not on PATH"
    listed = subprocess.run(
        [ctl, "-q", "list_vhosts"], capture_output=True, text=True, timeout=60, check=True
    )
    return set(listed.stdout.split())


def _databases() -> set[str]:
    import psycopg

    from bench.postgres import ADMIN_DSN

    with psycopg.connect(ADMIN_DSN) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_scale_out_benchmark_runs_both_configurations_and_leaves_nothing() -> None:
    require_rabbitmq()
    if not port_open("127.0.0.1", POSTGRES_PORT):
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres): start it")
    if shutil.which("haproxy") is None:
        pytest.fail("the scale-out benchmark needs haproxy: apt-get install haproxy")
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "scale-out", "--devices", "4", "--duration", "3",
         "--transport", "tcp", "--json", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {completed.stdout[-2000:]}"
    result = json.loads(lines[0])

    # The table (on stderr with --json) shows both configurations and the ratio.
    assert "one-hub" in completed.stderr and "two-hubs" in completed.stderr
    assert "two/one" in completed.stderr
    runs = result["runs"]
    assert [(r["configuration"], r["hubs"], r["transport"]) for r in runs] == [
        ("one-hub", 1, "tcp"),
        ("two-hubs", 2, "tcp"),
    ]
    for run in runs:
        assert run["connected"] == 4 and run["acknowledged"] > 0
        assert run["stored_once"], run
        assert run["duplicate_rows"] == 0 and run["missing_rows"] == 0
        assert run["distinct_envelopes"] >= run["acknowledged"]
        assert run["stored_per_s"] > 0 and run["hub_cpu_us_per_message"] > 0
    # Both hubs behind HAProxy took part, and HAProxy only in the two-hub run.
    assert all(n and n > 0 for n in runs[1]["envelopes_published_by_hub"])
    assert runs[0]["haproxy_cpu_us_per_message"] is None
    assert runs[1]["haproxy_cpu_us_per_message"] is not None
    assert result["ratio_two_to_one"]["tcp"]["stored_per_s"] > 0

    # Nothing left: processes, folder, vhosts, databases.
    assert _processes_in(result["workdir"]) == []
    assert not Path(result["workdir"]).exists()
    assert not {r["vhost"] for r in runs} & _vhosts()
    assert not {r["database"] for r in runs} & _databases()
