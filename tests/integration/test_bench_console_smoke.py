"""Smoke test of `python -m bench.console` on small numbers: it starts what it needs,
answers with every figure, and leaves no database behind. No timed assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support.services import port_open, require_rabbitmq

pytestmark = [pytest.mark.integration, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]


def _bench_databases() -> set[str]:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'hub_bench_console_%'"
        ).fetchall()
    return {r[0] for r in rows}


def test_the_console_benchmark_runs_small_and_cleans_up() -> None:
    require_rabbitmq()
    if not port_open("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres)", pytrace=False)
    before = _bench_databases()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.console",
            "all",
            "--devices",
            "200",
            "--rows",
            "4000",
            "--requests",
            "3",
            "--clients",
            "2",
            "--duration",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    lists, sse = figures["lists"], figures["sse"]
    for name in (
        "api_devices_page_of_100",
        "api_devices_online_filter",
        "devices_page_html_50",
        "api_telemetry_1000_rows",
        "query_telemetry_1000_rows",
    ):
        assert lists[name]["requests"] == 3 and lists[name]["p99_ms"] >= lists[name]["p50_ms"]
    assert sse["clients"] == 2 and sse["rate_with_clients_per_s"] > 0
    assert sse["events_per_client_min"] > 0
    assert _bench_databases() == before
