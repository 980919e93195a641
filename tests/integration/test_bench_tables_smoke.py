"""Smoke tests of `python -m bench partition-query` and `insert-cost` (SQLite and
PostgreSQL) at tiny sizes
(`bench workers`: tests/reliability/test_bench_workers_smoke.py, over a minute).

They check that each command runs, cleans up and prints one JSON line with its
figures. No timed assertions: the figures themselves are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]


def _run_bench(*args: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {completed.stdout[-2000:]}"
    return dict(json.loads(lines[0]))


def test_partition_query_benchmark_compares_both_tables() -> None:
    result = _run_bench("partition-query", "--rows", "20000", "--repeats", "3", "--days", "5")
    tables = result["tables"]
    assert set(tables) == {"partitioned", "unpartitioned"}
    for table in tables.values():
        for query in ("newest", "newest_day"):
            figures = table["queries"][query]
            assert figures["median_ms"] > 0 and figures["rows_returned"] > 0
    # The newest day's query reads only the newest partitions.
    plan = "\n".join(tables["partitioned"]["queries"]["newest_day"]["plan"])
    assert "telemetry_p" in plan


def test_insert_cost_benchmark_reports_both_keys() -> None:
    result = _run_bench("insert-cost", "--rows", "4000", "--step", "2000")
    assert result["rows_at"] == [2000, 4000]
    assert len(result["us_per_row"]) == 2
    for figures in result["us_per_row"].values():
        assert len(figures) == 2 and all(f > 0 for f in figures)


def test_insert_cost_on_postgres_stores_every_probe_row_at_each_size() -> None:
    result = _run_bench("insert-cost", "--postgres", "--rows", "20000", "--step", "10000")
    assert result["config"]["engine"] == "postgresql"
    assert result["rows_at"] == [10000, 20000]
    probes = result["config"]["probe_rows"]
    # Both sizes' probes are stored in both tables, none taken for a retransmission.
    assert result["rows_in_tables"] == {
        "partitioned": 20000 + 2 * probes,
        "unpartitioned": 20000 + 2 * probes,
    }
    for figures in result["us_per_row"].values():
        assert len(figures) == 2 and all(f > 0 for f in figures)
