"""Unit tests of the ingest tables: CPU per message before the rates, the seconds
every rate was measured over, the loop the hub reported, the plugin's column,
and the fleet-size table of `--fleet`."""

from __future__ import annotations

from typing import Any

from bench.fleet_sweep import fleet_table
from bench.report import ingest_table


def _system(
    stored_per_s: float, *, worker: bool = True, loop: str | None = "uvloop"
) -> dict[str, Any]:
    cpu = {"server": 100.0, "fleet": 20.0, **({"worker": 50.0} if worker else {})}
    return {
        "sent": 1000, "acknowledged": 1000, "stored": 1000, "all_stored": True,
        "acked_per_s": stored_per_s, "stored_per_s": stored_per_s,
        "fleet_duration_s": 12.4, "stored_span_s": 12.5, "cpu_us_per_message": cpu,
        "cpu_s": {"server": 1.0}, "server_rss_mb": {"peak": 100.0}, "event_loop": loop,
    }  # fmt: skip


def _result(transport: str, devices: int, **systems: Any) -> dict[str, Any]:
    return {
        "transport": transport,
        "machine": {"cpus": 2},
        "config": {
            "devices": devices, "duration_s": 10.0, "messages": None, "rate": 0.0, "qos": 1,
            "window": 64, "worker_pool": "prefork", "worker_concurrency": 2, "loop": "auto",
            "lean": True,
        },
        **systems,
    }  # fmt: skip


def test_the_table_puts_cpu_per_message_first_and_the_run_length_with_every_rate() -> None:
    result = _result(
        "mqtt", 50, hub=_system(1000.0), **{"rabbitmq-mqtt": _system(4000.0, worker=False)}
    )
    table = ingest_table(result)
    lines = table.splitlines()

    assert lines[1] == "hub event loop: uvloop (setting event_loop = auto)"
    labels = [line.strip() for line in lines[3:]]
    first_rate = next(i for i, text in enumerate(labels) if "msg/s" in text)
    first_cpu = next(i for i, text in enumerate(labels) if text.startswith("CPU us/message"))
    assert first_cpu < first_rate
    assert "hub/rabbitmq-mqtt" in lines[3]
    stored = next(line for line in lines if line.strip().startswith("stored msg/s"))
    assert "1,000 (12.5 s)" in stored and "4,000 (12.5 s)" in stored and "0.25x" in stored


def test_a_hub_that_did_not_report_its_loop_is_said_so() -> None:
    table = ingest_table(_result("tcp", 5, hub=_system(10.0, loop=None)))
    assert "did not report the loop" in table.splitlines()[1]


def test_the_fleet_table_has_a_line_per_size_and_system() -> None:
    runs = [
        _result("tcp", 10, hub=_system(9000.0)),
        _result("mqtt", 10, hub=_system(3000.0), **{"rabbitmq-mqtt": _system(12000.0)}),
    ]
    table = fleet_table({"counts": [10], "runs": runs})

    rows = [line.split() for line in table.splitlines()[3:]]
    assert [row[0] for row in rows] == ["10", "10", "10"]
    assert "9,000" in table and "3,000" in table and "12,000" in table
    assert "RabbitMQ MQTT plugin" in table
