"""Smoke tests of `python -m bench workers`, `partition-query` and `insert-cost` at tiny sizes.

They check that each command runs, cleans up, prints one JSON line with its
figures, and (workers) that every envelope was stored exactly once. No timed
assertions: the figures themselves are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import require_rabbitmq

pytestmark = pytest.mark.integration

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


@pytest.mark.reliability  # five worker starts, three vhosts and databases: over a minute
def test_workers_benchmark_stores_every_envelope_once() -> None:
    require_rabbitmq()
    result = _run_bench(
        "workers", "--counts", "1,2", "--hosts", "2", "--batches", "6", "--batch-size", "50"
    )
    assert [(r["workers"], r["other_hosts"]) for r in result["runs"]] == [
        (1, False),
        (2, False),
        (2, True),
    ]
    for run in result["runs"]:
        assert run["unique_envelopes"] == 300
        # Redelivered and retransmitted copies were published, and none was stored twice.
        assert run["envelopes_published"] > run["unique_envelopes"]
        assert run["rows"] == 300 and run["duplicate_rows"] == 0 and run["missing_rows"] == 0
        assert sum(run["rows_by_worker"].values()) == 300
        assert run["stored_per_s"] > 0
    hosts = result["runs"][2]["rows_by_worker"]
    assert {name.split("@")[1] for name in hosts} <= {"host0", "host1"}


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
