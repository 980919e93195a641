"""The reliability suite's bookkeeping: compare() and the report, on made-up data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.envelope import envelope_id
from tests.reliability.harness import Comparison, Stored, compare, record_result
from tests.reliability.report import load, render


def _stored(rows: dict[str, int], runs: dict[str, int]) -> Stored:
    return Stored(telemetry=rows, handler_runs=runs, order={})


def test_compare_counts_lost_duplicates_and_unprocessed() -> None:
    acked = {"d1": {(7, 1), (7, 2), (7, 3)}, "d2": {(9, 1)}}
    e = {(d, s): envelope_id(d, s, b) for d, pairs in acked.items() for b, s in pairs}
    stored = _stored(
        rows={e["d1", 1]: 1, e["d1", 2]: 1, e["d2", 1]: 1},
        runs={e["d1", 1]: 1, e["d1", 2]: 3},
    )
    result = compare(acked, stored)
    assert (result.acknowledged, result.stored, result.lost) == (4, 3, 1)
    assert result.lost_examples == ("d1 boot=7 seq=3",)
    assert result.duplicates == 2  # two extra handler runs of (d1, 2)
    assert result.unprocessed == 1  # (d2, 1) stored, its handler never ran
    assert not result.ok


def test_compare_all_good() -> None:
    acked = {"d1": {(1, 1)}}
    eid = envelope_id("d1", 1, 1)
    assert compare(acked, _stored({eid: 1}, {eid: 1})).ok


def test_results_are_json_lines_and_the_report_keeps_the_last_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.jsonl"
    monkeypatch.setenv("RELIABILITY_RESULTS", str(path))
    first = Comparison(acknowledged=10, stored=9, lost=1, duplicates=0, unprocessed=0)
    again = Comparison(acknowledged=12, stored=12, lost=0, duplicates=0, unprocessed=0)
    record_result("hub SIGKILL", "tcp", first, 1.23)
    record_result("hub SIGKILL", "tcp", again, 2.0)
    record_result("hub SIGKILL", "mqtt", again, None)
    assert len(path.read_text().splitlines()) == 3
    assert json.loads(path.read_text().splitlines()[0])["recovery_s"] == 1.2
    table = render(load(path))
    assert "| hub SIGKILL | tcp | 12 | 12 | 0 | 0 | 0 | 2.0 |" in table
    assert "| hub SIGKILL | mqtt | 12 | 12 | 0 | 0 | 0 | - |" in table
    assert "| 10 |" not in table
