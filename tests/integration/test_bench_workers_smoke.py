"""Smoke test of `python -m bench workers` at a tiny size, in the benchmark stage:
five worker starts, three vhosts and three databases take over a minute.

It checks that the command runs, cleans up, prints one JSON line, and that
every envelope was stored exactly once although redelivered and retransmitted
copies were published. No timed assertions.
"""

from __future__ import annotations

import pytest

from tests.integration.test_bench_tables_smoke import _run_bench
from tests.support.services import require_rabbitmq

pytestmark = [pytest.mark.integration, pytest.mark.bench]


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
