"""`python -m bench partition-query` and `python -m bench insert-cost`: the telemetry table at size.

Layer: benchmarks; may import anything.

partition-query: two PostgreSQL databases of the run's own, one at the
newest schema (telemetry partitioned by day, hub/upkeep.py) and one at the
schema before it (`0006_handler_runs`: one table keyed by envelope id), are
filled with the same N rows by `generate_series` in SQL (1,000 devices, 30
days ending now), analysed, then asked alternately for one device's newest
1,000 rows, unbounded and within the newest day. Median and p90 of the
query's time as the client sees it; the plan of each (EXPLAIN ANALYZE).

insert-cost: two SQLite files, one at each schema, take the same rows in
batches of 500 (with the new key, also the lookup of retransmissions that
storing does); the cost per row is printed for each slice of the table's
growth, so a cost that rises with the size shows. With `--postgres`, two
PostgreSQL databases (the newest schema, partitioned by day, and the one
before it) are filled step by step by `generate_series`, and at each size
20,000 new rows are stored into each: through the hub's own
`_insert_telemetry` (time key, retransmission lookup) and the old key's plain
insert.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.postgres import postgres_database
from bench.services import log

OLD_REVISION = "0006_handler_runs"
COLUMNS = "envelope_id, device_id, seq, received_at, stored_at, transport, protocol, payload"
FILL_CHUNK_ROWS = 1_000_000


def _fill_range(
    engine: Any, first: int, last: int, devices: int, start: datetime, step_us: int
) -> None:
    """Rows `first`..`last` (inclusive) of the same series as `_fill`, in chunks."""
    from sqlalchemy import text

    for low in range(first, last + 1, FILL_CHUNK_ROWS):
        high = min(last, low + FILL_CHUNK_ROWS - 1)
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO telemetry ({COLUMNS}) SELECT md5(i::text), "
                    "'dev-' || (i % :devices), i / :devices, "
                    "CAST(:start AS timestamptz) + make_interval(secs => i * :step / 1e6), "
                    "CAST(:start AS timestamptz) + make_interval(secs => i * :step / 1e6), "
                    "'tcp', 'native', json_build_object('t', i % 1000, 'h', i % 97) "
                    "FROM generate_series(CAST(:first AS bigint), :last) AS i"
                ),
                {"devices": devices, "start": start, "step": step_us, "first": low, "last": high},
            )


def _fill(
    engine: Any, rows: int, devices: int, start: datetime, span: timedelta, quiet: bool
) -> float:
    """Insert `rows` rows spread evenly over `span` from `start`; seconds taken."""
    step_us = max(1, int(span / timedelta(microseconds=1) / rows))
    began = time.monotonic()
    for first in range(0, rows, FILL_CHUNK_ROWS):
        last = min(rows, first + FILL_CHUNK_ROWS) - 1
        _fill_range(engine, first, last, devices, start, step_us)
        if not quiet:
            log(f"  {last + 1:,} / {rows:,} rows")
    _analyze(engine)
    return time.monotonic() - began


def _analyze(engine: Any) -> None:
    """Fresh planner statistics for the telemetry table (outside a transaction)."""
    from sqlalchemy import text

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE telemetry"))


def _time_query(engine: Any, sql: str, device: str, since: datetime) -> tuple[float, int]:
    from sqlalchemy import text

    with engine.connect() as conn:
        began = time.perf_counter()
        found = conn.execute(text(sql), {"d": device, "since": since}).all()
        return (time.perf_counter() - began) * 1000, len(found)


def _plan(engine: Any, sql: str, device: str, since: datetime) -> list[str]:
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(
            text(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}"), {"d": device, "since": since}
        )
        return [row[0] for row in rows]


def _execution_ms(plan: list[str]) -> float | None:
    for line in plan:
        if line.startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return None


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 3),
        "min_ms": round(ordered[0], 3),
    }


def run_partition_query(
    rows: int,
    *,
    devices: int = 1000,
    days: int = 30,
    last: int = 1000,
    repeats: int = 30,
    quiet: bool = False,
) -> dict[str, Any]:
    from hub.storage import make_engine, migrate
    from hub.upkeep import ensure_partitions

    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=days)
    queries = {
        "newest": (
            f"SELECT * FROM telemetry WHERE device_id = :d ORDER BY received_at DESC LIMIT {last}"
        ),
        "newest_day": (
            "SELECT * FROM telemetry WHERE device_id = :d AND received_at >= :since "
            f"ORDER BY received_at DESC LIMIT {last}"
        ),
    }
    result: dict[str, Any] = {
        "benchmark": "partition-query",
        "config": {
            "rows": rows,
            "devices": devices,
            "days": days,
            "last": last,
            "repeats": repeats,
        },
        "tables": {},
    }
    with postgres_database("partitioned") as url_p, postgres_database("flat") as url_f:
        migrate(url_p)
        migrate(url_f, OLD_REVISION)
        engines = {"partitioned": make_engine(url_p), "unpartitioned": make_engine(url_f)}
        try:
            with engines["partitioned"].begin() as conn:
                ensure_partitions(
                    conn, [(start + timedelta(days=n)).date() for n in range(days + 2)]
                )
            for name, engine in engines.items():
                if not quiet:
                    log(f"filling the {name} table with {rows:,} rows")
                fill_s = _fill(engine, rows, devices, start, now - start, quiet)
                result["tables"][name] = {"fill_s": round(fill_s, 1), "queries": {}}
            since = now - timedelta(days=1)
            samples: dict[str, dict[str, list[float]]] = {
                n: {q: [] for q in queries} for n in engines
            }
            returned: dict[str, dict[str, int]] = {n: {} for n in engines}
            for r in range(repeats + 2):
                device = f"dev-{(r * 7919) % devices}"
                for query, sql in queries.items():
                    # Alternate which table goes first, so neither always finds the cache warm.
                    order = list(engines) if r % 2 == 0 else list(reversed(engines))
                    for name in order:
                        ms, count = _time_query(engines[name], sql, device, since)
                        if r >= 2:  # the first two rounds warm the cache up
                            samples[name][query].append(ms)
                        returned[name][query] = count
            for name, engine in engines.items():
                for query, sql in queries.items():
                    plan = _plan(engine, sql, "dev-1", since)
                    result["tables"][name]["queries"][query] = {
                        **_summary(samples[name][query]),
                        "rows_returned": returned[name][query],
                        "server_ms": _execution_ms(plan),
                        "plan": plan,
                    }
        finally:
            for engine in engines.values():
                engine.dispose()
    return result


def _shape(plan: list[str]) -> str:
    """The plan's nodes below the Limit, in short: "Merge Append of 31 index scans"."""
    scans = sum(1 for line in plan if "Index Scan" in line)
    merge = any("Merge Append" in line or "Append" in line for line in plan)
    return f"{'Append of ' if merge else ''}{scans} index scan{'s' if scans != 1 else ''}"


def partition_query_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"one device's newest {cfg['last']:,} rows among {cfg['rows']:,} "
        f"({cfg['devices']:,} devices, {cfg['days']} days; {cfg['repeats']} queries each)",
        f"{'table':<14} {'query':<11} {'median ms':>10} {'p90 ms':>9} {'server ms':>10} "
        f"{'rows':>6}  plan",
    ]
    for name, table in result["tables"].items():
        for query, q in table["queries"].items():
            lines.append(
                f"{name:<14} {query:<11} {q['median_ms']:>10.2f} {q['p90_ms']:>9.2f} "
                f"{q['server_ms'] or 0:>10.2f} {q['rows_returned']:>6}  {_shape(q['plan'])}"
            )
    lines.append(
        "fill (generate_series): "
        + ", ".join(f"{n} {t['fill_s']:.1f} s" for n, t in result["tables"].items())
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# insert-cost (SQLite)
# ---------------------------------------------------------------------------

_PROBE = (
    "SELECT DISTINCT t.envelope_id FROM json_each(?) AS p "
    "JOIN telemetry AS t INDEXED BY ix_telemetry_device_seq "
    "ON t.device_id = json_extract(p.value, '$.d') AND t.seq = json_extract(p.value, '$.s') "
    "AND t.envelope_id = json_extract(p.value, '$.e') WHERE t.received_at >= ?"
)


def _sqlite_file(path: Path, revision: str) -> sqlite3.Connection:
    from hub.storage import migrate

    migrate(f"sqlite:///{path}", revision)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # Not the hub's FULL: the fsync per commit would hide what the index costs.
    conn.execute("PRAGMA synchronous=OFF")
    return conn


def run_insert_cost(
    rows: int, *, step: int, folder: Path, devices: int = 100, batch: int = 500, quiet: bool = False
) -> dict[str, Any]:
    keys = {"random key (envelope_id)": OLD_REVISION, "time key (received_at, envelope_id)": "head"}
    conns = {
        name: _sqlite_file(folder / f"{n}.sqlite3", rev)
        for n, (name, rev) in enumerate(keys.items())
    }
    start = datetime(2026, 1, 1, tzinfo=UTC)
    insert = (
        f"INSERT INTO telemetry ({COLUMNS}) VALUES (?, ?, ?, ?, ?, 'tcp', 'native', ?) "
        "ON CONFLICT DO NOTHING"
    )
    slices: dict[str, list[float]] = {name: [] for name in conns}
    spent = dict.fromkeys(conns, 0.0)
    done = 0
    while done < rows:
        size = min(batch, rows - done)
        records = []
        for i in range(done, done + size):
            device, seq = f"dev-{i % devices}", i // devices
            digest = hashlib.blake2b(f"{device}\x001\x00{seq}".encode(), digest_size=16).hexdigest()
            at = (start + timedelta(milliseconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f")
            records.append((digest, device, seq, at, at, json.dumps({"t": i % 1000})))
        probes = json.dumps([{"d": r[1], "s": r[2], "e": r[0]} for r in records])
        for name, conn in conns.items():
            began = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, records)
            if name.startswith("time"):
                conn.execute(_PROBE, (probes, records[0][3])).fetchall()
            conn.execute("COMMIT")
            spent[name] += time.perf_counter() - began
        done += size
        if done % step == 0 or done == rows:
            for name in conns:
                slices[name].append(spent[name] / step * 1e6)
                spent[name] = 0.0
            if not quiet:
                log(
                    f"  {done:,} rows: "
                    + ", ".join(f"{n} {slices[n][-1]:.1f} us/row" for n in conns)
                )
    for conn in conns.values():
        conn.close()
    return {
        "benchmark": "insert-cost",
        "config": {
            "rows": rows,
            "step": step,
            "devices": devices,
            "batch": batch,
            "engine": "sqlite",
        },
        "us_per_row": slices,
        "rows_at": [min(rows, step * (n + 1)) for n in range(len(next(iter(slices.values()))))],
    }


# ---------------------------------------------------------------------------
# insert-cost --postgres
# ---------------------------------------------------------------------------


def _probe_rows(
    size: int, batch_no: int, devices: int, at: datetime, seq_base: int
) -> list[dict[str, Any]]:
    """One batch of new telemetry rows as the workers store them, received at `at`."""
    rows = []
    for n in range(size):
        device = f"dev-{n % devices}"
        seq = seq_base + batch_no * size + n
        digest = hashlib.blake2b(f"{device}\x00probe\x00{seq}".encode(), digest_size=16)
        received = at + timedelta(microseconds=n)
        rows.append(
            {
                "envelope_id": digest.hexdigest(),
                "device_id": device,
                "seq": seq,
                "device_time": None,
                "received_at": received,
                "stored_at": received,
                "transport": "tcp",
                "protocol": "native",
                "payload": {"t": n % 1000},
            }
        )
    return rows


def _insert_old_key(conn: Any, rows: list[dict[str, Any]]) -> None:
    """What storing did with the old key: one insert, the envelope id deciding."""
    from sqlalchemy import text

    from hub.storage import _dumps, _iso

    old_columns = (
        "envelope_id, device_id, seq, received_at, stored_at, transport, protocol, payload"
    )
    conn.execute(
        text(
            f"INSERT INTO telemetry ({old_columns}) SELECT {old_columns} "
            "FROM json_populate_recordset(NULL::telemetry, :rows) ON CONFLICT DO NOTHING"
        ),
        {"rows": _dumps(rows, _iso)},
    )


def run_insert_cost_postgres(
    rows: int,
    *,
    step: int,
    devices: int = 1000,
    days: int = 30,
    probe_batches: int = 40,
    batch: int = 500,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fill two PostgreSQL tables step by step (generate_series) and, at each
    size, time `probe_batches` batches of `batch` new rows stored the way the
    workers store them: the hub's own `_insert_telemetry` (time key,
    partitioned by day, with the retransmission lookup) against the old key's
    plain insert. The rows of the series are spread over `days` days in
    order, and each probe is received just after the newest row so far, as
    live telemetry is: on the partitioned table it lands in that day's
    partition."""
    from hub.storage import _insert_telemetry, make_engine, migrate
    from hub.upkeep import ensure_partitions

    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=days)
    step_us = max(1, int(timedelta(days=days) / timedelta(microseconds=1) / rows))
    window = timedelta(hours=24)
    names = {
        "partitioned": "time key (received_at, envelope_id), by day",
        "unpartitioned": "random key (envelope_id)",
    }
    slices: dict[str, list[float]] = {label: [] for label in names.values()}
    sizes: list[int] = []
    with postgres_database("cost_p") as url_p, postgres_database("cost_f") as url_f:
        migrate(url_p)
        migrate(url_f, OLD_REVISION)
        engines = {"partitioned": make_engine(url_p), "unpartitioned": make_engine(url_f)}
        try:
            with engines["partitioned"].begin() as conn:
                ensure_partitions(
                    conn, [(start + timedelta(days=n)).date() for n in range(days + 2)]
                )
            done = 0
            while done < rows:
                target = min(rows, done + step)
                for name, engine in engines.items():
                    if not quiet:
                        log(f"  filling {name} to {target:,} rows")
                    _fill_range(engine, done, target - 1, devices, start, step_us)
                    _analyze(engine)
                done = target
                at = start + timedelta(microseconds=done * step_us)
                sizes.append(done)
                for name, engine in engines.items():
                    spent = 0.0
                    for b in range(probe_batches):
                        records = _probe_rows(
                            batch,
                            b,
                            devices,
                            at,
                            seq_base=10**9 + len(sizes) * probe_batches * batch,
                        )
                        began = time.perf_counter()
                        with engine.begin() as conn:
                            if name == "partitioned":
                                _insert_telemetry(conn, records, window)
                            else:
                                _insert_old_key(conn, records)
                        spent += time.perf_counter() - began
                    slices[names[name]].append(spent / (probe_batches * batch) * 1e6)
                if not quiet:
                    log(
                        f"  {done:,} rows: "
                        + ", ".join(f"{label} {v[-1]:.1f} us/row" for label, v in slices.items())
                    )
            from sqlalchemy import text

            counted = {}
            for name, engine in engines.items():
                with engine.connect() as conn:
                    counted[name] = int(
                        conn.execute(text("SELECT count(*) FROM telemetry")).scalar_one()
                    )
        finally:
            for engine in engines.values():
                engine.dispose()
    return {
        "benchmark": "insert-cost",
        #: Rows in each table at the end: the series and every probe row.
        "rows_in_tables": counted,
        "config": {
            "rows": rows,
            "step": step,
            "devices": devices,
            "batch": batch,
            "probe_rows": probe_batches * batch,
            "engine": "postgresql",
        },
        "us_per_row": slices,
        "rows_at": sizes,
    }


def insert_cost_table(result: dict[str, Any]) -> str:
    names = list(result["us_per_row"])
    cfg = result["config"]
    heading = (
        "PostgreSQL, cost per row (us) of storing "
        f"{cfg.get('probe_rows', 0):,} new rows (batches of {cfg['batch']}) at each size"
        if cfg.get("engine") == "postgresql"
        else "SQLite, insert cost per row (us) in each slice of the table's growth "
        f"(batches of {cfg['batch']}, synchronous=OFF)"
    )
    lines = [
        heading,
        f"{'rows in table':>14} " + " ".join(f"{n:>36}" for n in names),
    ]
    for i, at in enumerate(result["rows_at"]):
        lines.append(
            f"{at:>14,} " + " ".join(f"{result['us_per_row'][n][i]:>36.1f}" for n in names)
        )
    return "\n".join(lines)
