"""The pure parts of `python -m bench against`: reading a run, medians, ratios, the table."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import _split_passthrough
from bench.against_figures import (
    RunFigures,
    against_table,
    check_ingest_options,
    parse_ingest_output,
    summarise,
)
from bench.services import BenchError


def _ingest_line(stored: float, server_us: float, *, all_stored: bool = True) -> str:
    hub = {
        "stored_per_s": stored,
        "acked_per_s": stored * 1.1,
        "all_stored": all_stored,
        "cpu_us_per_message": {"server": server_us, "worker": 2 * server_us, "fleet": 10.0},
    }
    return json.dumps({"benchmark": "ingest", "transport": "tcp", "hub": hub, "baseline": None})


def _run(side: str, round_: int, stored: float, server_us: float = 100.0) -> RunFigures:
    return parse_ingest_output(
        _ingest_line(stored, server_us), transport="tcp", side=side, round_=round_
    )


def test_parse_reads_the_hub_figures_from_the_last_line() -> None:
    stdout = "some table line\n" + _ingest_line(1234.5, 80.0) + "\n\n"

    figures = parse_ingest_output(stdout, transport="tcp", side="rev", round_=2)

    assert figures.stored_per_s == 1234.5
    assert figures.all_stored is True
    assert figures.cpu_us_per_message == {"server": 80.0, "worker": 160.0, "fleet": 10.0}
    assert (figures.side, figures.round, figures.transport) == ("rev", 2, "tcp")


@pytest.mark.parametrize(
    "stdout", ["", "not json\n", json.dumps({"benchmark": "ingest", "hub": None})]
)
def test_parse_refuses_output_without_hub_figures(stdout: str) -> None:
    with pytest.raises(BenchError):
        parse_ingest_output(stdout, transport="tcp", side="current", round_=1)


def test_summary_takes_medians_spread_and_ratio_current_over_rev() -> None:
    runs = [
        _run("rev", 1, 1000.0, 100.0),
        _run("current", 1, 1100.0, 90.0),
        _run("rev", 2, 900.0, 120.0),
        _run("current", 2, 1300.0, 80.0),
        _run("rev", 3, 1200.0, 110.0),
        _run("current", 3, 1200.0, 70.0),
    ]

    tcp = summarise(runs)["tcp"]

    assert tcp["rev"]["median_stored_per_s"] == 1000.0
    assert tcp["current"]["median_stored_per_s"] == 1200.0
    assert (tcp["rev"]["min_stored_per_s"], tcp["rev"]["max_stored_per_s"]) == (900.0, 1200.0)
    assert tcp["ratio"]["stored_per_s"] == 1.2
    assert tcp["rev"]["median_cpu_us_per_message"]["server"] == 110.0
    assert tcp["current"]["median_cpu_us_per_message"]["server"] == 80.0
    assert tcp["ratio"]["cpu_us_per_message"]["server"] == round(80 / 110, 3)


def test_table_shows_medians_ratio_spread_and_cpu() -> None:
    runs = [_run("rev", 1, 1000.0, 100.0), _run("current", 1, 1500.0, 50.0)]

    table = against_table(summarise(runs), "main (abc123)", "def456")

    assert "ingest over tcp" in table
    assert "current/REV" in table
    assert "1.50x" in table
    assert "1,000-1,000" in table
    assert "CPU us/message: server" in table
    assert "0.50x" in table
    assert "warning" not in table


def test_table_warns_when_a_run_did_not_store_everything() -> None:
    lost = parse_ingest_output(
        _ingest_line(10.0, 1.0, all_stored=False), transport="tcp", side="rev", round_=1
    )
    table = against_table(summarise([lost, _run("current", 1, 10.0)]), "old", "new")

    assert "did not store every message" in table


def test_ratio_is_absent_when_a_side_stored_nothing() -> None:
    tcp = summarise([_run("rev", 1, 0.0), _run("current", 1, 100.0)])["tcp"]

    assert tcp["ratio"]["stored_per_s"] is None


@pytest.mark.parametrize("option", ["--transport", "--json", "--out=x.json", "--sweep", "-q"])
def test_options_that_against_sets_itself_are_refused(option: str) -> None:
    with pytest.raises(BenchError, match=option.split("=")[0]):
        check_ingest_options(["--devices", "2", option])


def test_ingest_options_are_split_off_after_the_double_dash() -> None:
    own, rest = _split_passthrough(["against", "HEAD", "--rounds", "1", "--", "--devices", "2"])

    assert own == ["against", "HEAD", "--rounds", "1"]
    assert rest == ["--devices", "2"]
    assert _split_passthrough(["ingest", "--devices", "2"]) == (["ingest", "--devices", "2"], [])
