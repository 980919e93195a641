"""What the workers stored: row counts, device-to-stored latency and the stored-rows timeline.

Layer: benchmarks; may import anything.

Both the hub's `telemetry` table and the baseline's `bench_baseline_readings`
have `device_id`, `device_time` (the device's clock when it built the
message, Unix milliseconds from the simulator) and `stored_at` (the worker's
clock when it wrote the row's transaction). Latency is `stored_at -
device_time`, computed in SQL at millisecond resolution, on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, text


def _epoch(engine: Engine, column: str) -> str:
    if engine.dialect.name == "sqlite":
        # SQLite keeps date-times as text; julianday() reads them to the millisecond.
        return f"((julianday({column}) - 2440587.5) * 86400.0)"
    return f"EXTRACT(EPOCH FROM {column})"


def _where(prefix: str) -> tuple[str, dict[str, Any]]:
    if not prefix:
        return "", {}
    return " WHERE device_id LIKE :prefix", {"prefix": prefix.replace("%", "") + "%"}


def count(engine: Engine, table: str, prefix: str = "") -> int:
    """Rows of `table` whose device id starts with `prefix` (all rows without one)."""
    where, params = _where(prefix)
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}{where}"), params).scalar_one())


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def stored_stats(engine: Engine, table: str, prefix: str = "") -> dict[str, Any]:
    """Count, latency percentiles (ms), first device time, last stored time and the
    stored-rows-per-second timeline (by whole seconds of `stored_at`)."""
    where, params = _where(prefix)
    device = _epoch(engine, "device_time")
    stored = _epoch(engine, "stored_at")
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT {device}, {stored} FROM {table}{where}"), params).all()
    latencies: list[float] = []
    per_second: dict[int, int] = {}
    first_device = math.inf
    last_stored = 0.0
    for device_s, stored_s in rows:
        stored_f = float(stored_s)
        last_stored = max(last_stored, stored_f)
        second = int(stored_f)
        per_second[second] = per_second.get(second, 0) + 1
        if device_s is not None:
            device_f = float(device_s)
            first_device = min(first_device, device_f)
            latencies.append((stored_f - device_f) * 1000.0)
    latencies.sort()
    timeline: list[int] = []
    if per_second:
        start = min(per_second)
        timeline = [per_second.get(s, 0) for s in range(start, max(per_second) + 1)]
    return {
        "rows": len(rows),
        "first_device_time": first_device if latencies else None,
        "last_stored_at": last_stored if rows else None,
        "timeline_start": min(per_second) if per_second else None,
        "timeline": timeline,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 1),
            "p90": round(percentile(latencies, 0.90), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "max": round(latencies[-1], 1) if latencies else 0.0,
            "mean": round(sum(latencies) / len(latencies), 1) if latencies else 0.0,
        },
    }
