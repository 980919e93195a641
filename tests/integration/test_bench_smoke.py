"""Smoke test of the benchmark command: a few seconds of a small fleet, hub and baseline.

It checks that `python -m bench ingest` starts and cleans up everything it
needs, prints one well-formed JSON line, and that every message sent was
stored, by the hub and by the baseline. No timed assertions: the figures
themselves are not checked, only that they are there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.services import require_rabbitmq

pytestmark = [pytest.mark.integration, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]

SYSTEM_KEYS = {
    "sent",
    "acknowledged",
    "stored",
    "all_stored",
    "acked_per_s",
    "stored_per_s",
    "latency_ms",
    "cpu_s",
    "server_rss_mb",
}


def _run_bench(*args: str) -> tuple[dict[str, Any], str]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {completed.stdout[-2000:]}"
    return json.loads(lines[0]), completed.stderr


def test_tcp_ingest_benchmark_stores_every_message_of_hub_and_baseline() -> None:
    require_rabbitmq()
    result, stderr = _run_bench(
        "ingest", "--transport", "tcp", "--devices", "4", "--duration", "3",
        "--rate", "100", "--json", "--quiet",
    )  # fmt: skip

    assert result["benchmark"] == "ingest"
    assert result["transport"] == "tcp"
    for system in ("hub", "baseline"):
        measured = result[system]
        assert measured.keys() >= SYSTEM_KEYS, system
        assert measured["sent"] > 0, system
        assert measured["acknowledged"] == measured["sent"], system
        assert measured["stored"] == measured["sent"], system
        assert measured["all_stored"] is True, system
        assert measured["errors"] == 0, system
        assert set(measured["latency_ms"]) >= {"p50", "p99"}, system
        assert set(measured["cpu_s"]) >= {"server", "worker", "fleet"}, system
    assert set(result["ratio"]) == {"acked_per_s", "stored_per_s"}
    # The readable table went to stderr (--json keeps stdout to the JSON line).
    assert "hub/baseline" in stderr


def test_tcp_ingest_over_tls_benchmark_stores_every_message_of_both_listeners() -> None:
    require_rabbitmq()
    result, stderr = _run_bench(
        "ingest", "--transport", "tcp", "--tls", "--devices", "4", "--duration", "3",
        "--rate", "100", "--json", "--quiet",
    )  # fmt: skip

    assert result["benchmark"] == "ingest-tls"
    for listener in ("clear", "tls"):
        measured = result[listener]
        assert measured.keys() >= SYSTEM_KEYS, listener
        assert measured["sent"] > 0, listener
        assert measured["stored"] == measured["acknowledged"] == measured["sent"], listener
        assert measured["errors"] == 0, listener
    assert set(result["ratio"]) == {"acked_per_s", "stored_per_s"}
    assert "TLS/clear" in stderr


def test_mqtt_ingest_over_tls_benchmark_stores_every_message_of_both_listeners() -> None:
    require_rabbitmq()
    result, stderr = _run_bench(
        "ingest", "--transport", "mqtt", "--tls", "--devices", "4", "--duration", "3",
        "--rate", "50", "--json", "--quiet",
    )  # fmt: skip

    assert result["benchmark"] == "ingest-tls"
    assert result["transport"] == "mqtt" and result["config"]["qos"] == 1
    for listener in ("clear", "tls"):
        measured = result[listener]
        assert measured.keys() >= SYSTEM_KEYS, listener
        assert measured["sent"] > 0, listener
        assert measured["stored"] == measured["acknowledged"] == measured["sent"], listener
        assert measured["errors"] == 0, listener
    assert set(result["ratio"]) == {"acked_per_s", "stored_per_s"}
    assert "MQTT QoS 1 ingest over TLS" in stderr and "TLS/clear" in stderr


def test_tls_connections_benchmark_prints_memory_and_handshake_figures() -> None:
    require_rabbitmq()
    result, stderr = _run_bench(
        "tls-connections", "--devices", "20", "--probes", "5", "--hold", "1", "--json",
        "--quiet",
    )  # fmt: skip

    assert result["benchmark"] == "tls-connections"
    for listener in ("clear", "tls"):
        measured = result[listener]
        assert measured["held_by_hub"] == measured["devices"] == 20, listener
        assert "rss_kb_per_connection" in measured, listener
        probe = measured["probe"]
        assert probe["failed"] == 0, listener
        assert set(probe["handshake_ms"]) == set(probe["login_ms"]) == {"p50", "p99"}, listener
    assert set(result["ratio"]) == {"rss_kb_per_connection", "login_ms_p50"}
    assert "handshake ms p50" in stderr and "TLS/clear" in stderr


def test_connections_benchmark_restarts_the_hub_and_sees_every_device_back() -> None:
    require_rabbitmq()
    result, stderr = _run_bench(
        "connections", "--tcp", "0", "--mqtt", "30", "--lean", "--hold", "1", "--restart",
        "--connect-timeout", "120", "--json", "--quiet",
    )  # fmt: skip

    mqtt = result["mqtt"]
    assert mqtt["held_by_hub"] == mqtt["devices"] == 30
    again = mqtt["restart"]
    # Held by the new hub process: every device reconnected by itself.
    assert again["held_by_hub"] == 30 and again["all_back_s"] is not None
    assert again["all_back_s"] >= again["hub_down_s"] > 0
    assert "hub restarted with the fleet up: all 30 back" in stderr


def test_mqtt_ingest_benchmark_stores_every_message_of_hub_and_baseline() -> None:
    require_rabbitmq()
    result, _ = _run_bench(
        "ingest", "--transport", "mqtt", "--devices", "4", "--duration", "3",
        "--rate", "50", "--json", "--quiet",
    )  # fmt: skip

    assert result["transport"] == "mqtt"
    for system in ("hub", "baseline"):
        measured = result[system]
        assert measured.keys() >= SYSTEM_KEYS, system
        assert measured["sent"] > 0, system
        assert measured["stored"] == measured["sent"], system
        assert measured["all_stored"] is True, system
    # The load generator's cost is reported, and the loop the hub really ran on.
    assert set(result["hub"]["cpu_us_per_message"]) >= {"server", "worker", "fleet"}
    assert result["hub"]["event_loop"] in ("asyncio", "uvloop")
    assert result["config"]["lean"] is True


# A private RabbitMQ node takes 10-20 s to start and stop: the benchmark stage.
def test_mqtt_ingest_against_rabbitmqs_mqtt_plugin_counts_both_and_leaves_no_node() -> None:
    require_rabbitmq()
    before = _private_nodes()
    folders = set(Path(tempfile.gettempdir()).glob("bench-rabbitmq-*"))
    result, stderr = _run_bench(
        "ingest", "--transport", "mqtt", "--against", "rabbitmq-mqtt", "--devices", "4",
        "--duration", "3", "--rate", "50", "--json", "--quiet",
    )  # fmt: skip

    assert "baseline" not in result
    plugin = result["rabbitmq-mqtt"]
    assert plugin["node"].startswith("benchmq-")
    for system in ("hub", "rabbitmq-mqtt"):
        measured = result[system]
        assert measured["sent"] > 0, system
        assert measured["acknowledged"] == measured["sent"], system
        assert measured["stored"] == measured["sent"], system
        assert measured["errors"] == 0 and measured["refused"] == 0, system
        assert set(measured["cpu_us_per_message"]) >= {"server", "fleet"}, system
    assert set(result["ratio_to_rabbitmq_mqtt"]) == {"acked_per_s", "stored_per_s"}
    assert "hub/rabbitmq-mqtt" in stderr
    # The node was stopped and its folder removed.
    assert _private_nodes() == before
    assert set(Path(tempfile.gettempdir()).glob("bench-rabbitmq-*")) == folders


def _private_nodes() -> set[str]:
    """Private benchmark nodes alive now (their beam processes' node names)."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "beam.smp":
            found |= {arg for arg in cmdline if arg.startswith("benchmq-")}
    return found
