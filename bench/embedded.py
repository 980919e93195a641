"""`python -m bench.embedded`: throughput of the embedded default, tree against tree.

Layer: benchmarks; may import anything.

`python -m bench ingest` measures the RabbitMQ path. This measures `hub run`
with no RabbitMQ (local queue, in-hub worker) for one or more source trees
in one invocation, so that two commits run side by side on the same machine
and load (check the older one out with `git worktree add --detach DIR REV`):

    python -m bench.embedded --tree /tmp/old --tree . --devices 20 --messages 250

For each tree: a fresh data folder, `hub run --no-mqtt` started from that tree,
a TCP fleet (`firmware-sim`, as fast as acknowledged, window 64) registered in
its database; it reports acknowledged/s (the fleet's rate), stored/s (every
message stored, measured from the fleet's start), and the message rows and
bytes (WAL included) of the queue file after the run. Bounded: devices x messages messages per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tree: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(
        HUB_DATA_DIR=str(data_dir),
        HUB_HOST="127.0.0.1",
        PYTHONPATH=os.pathsep.join([str(tree), str(tree / "firmware-sim")]),
    )
    return env


def _stored(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "hub.sqlite3", timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM telemetry").fetchone()[0])


def _queue_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("queue.sqlite3*"))


def _queue_rows(data_dir: Path) -> int:
    """Message rows left in the queue file (kombu's SQLAlchemy transport or ours)."""
    with sqlite3.connect(data_dir / "queue.sqlite3", timeout=30) as db:
        tables = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if "message" in r[0]
        ]
        return sum(int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables)


def run_tree(tree: Path, devices: int, messages: int, folder: Path) -> dict[str, Any]:
    data_dir = folder / "data"
    env = _env(tree, data_dir)
    ids = [f"emb-{n}" for n in range(1, devices + 1)]
    provision = (
        "import json,sys; from hub.storage import migrate, make_engine; "
        "from hub.registry import Registry; url=sys.argv[1]; migrate(url); "
        "r=Registry(make_engine(url)); print(json.dumps({d: r.add(d) for d in sys.argv[2:]}))"
    )
    data_dir.mkdir(parents=True)
    url = f"sqlite:///{data_dir / 'hub.sqlite3'}"
    creds = subprocess.run(
        [sys.executable, "-c", provision, url, *ids],
        cwd=tree, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    (folder / "creds.json").write_text(creds)
    port = _free_port()
    log = (folder / "hub.log").open("w+")
    hub = subprocess.Popen(
        [sys.executable, "-m", "hubapp.cli", "run", "--no-mqtt", "--tcp-port", str(port),
         "--http-port", str(_free_port())],
        cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Press Ctrl+C" not in (folder / "hub.log").read_text():
            if hub.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((folder / "hub.log").read_text())
            time.sleep(0.2)
        time.sleep(3)  # let the worker child finish starting
        started = time.monotonic()
        fleet = subprocess.run(
            [sys.executable, "-c", "from firmware_sim.cli import main; main()", "tcp",
             "--port", str(port), "--devices", str(devices), "--messages", str(messages),
             "--prefix", "emb-", "--credentials-file", str(folder / "creds.json"),
             "--json", "--quiet"],
            cwd=tree, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        summary = json.loads(fleet.stdout)
        expected = devices * messages
        while _stored(data_dir) < summary["acknowledged"]:
            if time.monotonic() - started > 900:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        stored = _stored(data_dir)
        time.sleep(2)
        return {
            "tree": str(tree),
            "messages": expected,
            "acknowledged": summary["acknowledged"],
            "acknowledged_per_s": round(summary["rate_per_s"], 1),
            "stored": stored,
            "stored_per_s": round(stored / elapsed, 1),
            "queue_rows_after": _queue_rows(data_dir),
            "queue_bytes_after": _queue_bytes(data_dir),
        }
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(120)
        except subprocess.TimeoutExpired:
            hub.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embedded", description=__doc__)
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--messages", type=int, default=250, help="per device")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
        results = [
            run_tree(tree.resolve(), args.devices, args.messages, Path(tmp) / f"run{i}")
            for i, tree in enumerate(args.tree)
        ]
    for r in results:
        print(
            f"{r['tree']}: acknowledged {r['acknowledged']}/{r['messages']} at "
            f"{r['acknowledged_per_s']}/s, stored {r['stored']} at {r['stored_per_s']}/s, "
            f"queue after: {r['queue_rows_after']} rows, {r['queue_bytes_after'] / 1024:.0f} KiB"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
