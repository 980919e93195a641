"""bridges.address_gate: refusals counted by reason, logged at most once per interval."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bridges.address_gate import AddressGate
from hub.metrics import Metrics
from hub.settings import load_settings


def test_a_flood_of_refusals_is_counted_each_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        max_connects_per_address_per_s=1.0,
        connect_burst_per_address=2,
        max_connections_per_address=0,
    )
    metrics = Metrics()
    gate = AddressGate(settings, metrics, "tcp")
    with caplog.at_level(logging.WARNING, logger="bridges.address_gate"):
        admitted = [gate.admit("198.51.100.7") for _ in range(1000)]
    assert admitted[:2] == [True, True] and not any(admitted[2:])
    refused = metrics.registry.get_sample_value(
        "hub_connections_refused_total", {"transport": "tcp", "reason": "per_address_rate"}
    )
    assert refused == 998
    assert len(caplog.records) == 1  # the first refusal; the rest wait for the interval
    assert "per_address_rate" in caplog.records[0].getMessage()
    assert gate.admit("198.51.100.8")  # another address is not affected


def test_all_limits_off_leaves_the_gate_inactive(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        max_connects_per_address_per_s=0,
        max_connections_per_address=0,
        auth_failures_per_address=0,
    )
    assert not AddressGate(settings, Metrics(), "mqtt").active
