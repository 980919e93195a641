"""`python -m bench workers`: telemetry stored per second with 1, 2, 4 ... worker processes.

Layer: benchmarks; may import anything.

Each configuration gets a fresh RabbitMQ vhost and a fresh PostgreSQL
database (partitioned telemetry, the newest schema). Its workers
(`celery -A tasks worker --pool=solo`, one process each, consuming
`hub.telemetry`) start first; once RabbitMQ shows all of them consuming, the
benchmark publishes the same task messages the hub would (batches of
envelopes of `--devices` devices) as fast as RabbitMQ confirms them, and
times until every row is stored. The "other hosts" configuration starts its
workers each in a working directory and data folder of its own, under a host
name of its own: what a worker on another machine shares with the others is
then only RabbitMQ and the database, as it would be.

Some batches are published twice (a redelivery: same envelopes) and some
messages again in later batches with a later `received_at` (a device's
retransmission through another hub); the run checks that every envelope id is
stored exactly once. Figures: stored msg/s in all, per worker, each worker's
share (`worker_counters`), and CPU microseconds per stored row of the workers.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.postgres import postgres_database
from bench.services import ROOT, BenchError, Child, QueueProbe, Vhost, log, wait_until

if TYPE_CHECKING:
    from hub.settings import Settings


@dataclass
class WorkersConfig:
    counts: list[int] = field(default_factory=lambda: [1, 2, 4])
    #: Workers of the "other hosts" run (0: none).
    hosts: int = 2
    batches: int = 100
    batch_size: int = 500
    devices: int = 200
    #: Share of batches also delivered a second time, and of messages retransmitted.
    duplicates: float = 0.05
    rounds: int = 1
    drain_timeout_s: float = 300.0
    quiet: bool = False


def _batches(cfg: WorkersConfig, start: datetime) -> tuple[list[list[dict[str, Any]]], int]:
    """The task bodies to publish, and how many distinct envelopes they hold."""
    from hub.envelope import Envelope, Kind, envelope_id

    rng = random.Random(7)
    batches: list[list[dict[str, Any]]] = []
    resent: list[Envelope] = []
    n = 0
    for b in range(cfg.batches):
        batch = []
        for _ in range(cfg.batch_size):
            device = f"bench-{n % cfg.devices}"
            seq = n // cfg.devices
            env = Envelope(
                id=envelope_id(device, seq, boot_id=1),
                device_id=device,
                kind=Kind.TELEMETRY,
                payload={"t": round(rng.uniform(15, 30), 2), "n": n},
                transport="tcp",
                protocol="native",
                seq=seq,
                received_at=start + timedelta(microseconds=n * 50),
            )
            batch.append(env)
            if rng.random() < cfg.duplicates:
                resent.append(env)
            n += 1
        batches.append([e.to_dict() for e in batch])
        if rng.random() < cfg.duplicates:
            batches.append(batches[-1])  # delivered again, as after a worker died
        if len(resent) >= cfg.batch_size or b == cfg.batches - 1:
            later = [
                Envelope(**{**_fields(e), "received_at": e.received_at + timedelta(seconds=5)})
                for e in resent
            ]
            if later:
                batches.append([e.to_dict() for e in later])
            resent = []
    return batches, n


def _fields(env: Any) -> dict[str, Any]:
    return {name: getattr(env, name) for name in env.__dataclass_fields__}


def _start_workers(
    label: str, count: int, settings: Any, folder: Path, *, other_hosts: bool
) -> list[Child]:
    from tasks.worker import celery_worker_command, worker_environment

    workers = []
    for n in range(count):
        if other_hosts:
            # A host of its own: working directory, data folder and host name.
            home = Path(tempfile.mkdtemp(prefix=f"host{n}-", dir=folder))
            worker_settings = settings.model_copy(update={"data_dir": home / "data"})
            hostname = f"{label}-{n}@host{n}"
        else:
            home = ROOT
            worker_settings = settings
            hostname = f"{label}-{n}@%h"
        env = worker_environment(
            worker_settings, python_path=[str(ROOT), str(ROOT / "firmware-sim")]
        )
        argv = celery_worker_command(
            concurrency=1, pool="solo", queues=["hub.telemetry"], heartbeat=False, hostname=hostname
        )
        workers.append(
            Child(
                f"worker {hostname}", argv, env=env, log_path=folder / f"{label}-{n}.log", cwd=home
            )
        )
    return workers


def _publisher(settings: Settings) -> Any:
    """A Celery app of this run's own that publishes as the hub does (JSON, confirmed,
    to the hub's durable queues); the next run, on another vhost, gets a new one."""
    from celery import Celery

    from tasks.application import celery_queues

    app = Celery("bench-publisher", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_queues=celery_queues(settings),
        broker_transport_options={"confirm_publish": True},
    )
    return app


def _run_one(
    label: str, count: int, cfg: WorkersConfig, folder: Path, *, other_hosts: bool
) -> dict[str, Any]:
    from sqlalchemy import select, text

    from hub.settings import load_settings
    from hub.storage import make_engine, migrate
    from hub.worker_metrics import ROWS_STORED, WorkerCounter

    with Vhost(f"workers-{label}") as vhost, postgres_database(f"workers_{label}") as url:
        migrate(url)
        settings = load_settings(
            None, data_dir=folder / "data", broker_url=vhost.url, database_url=url
        )
        engine = make_engine(url)
        probe = QueueProbe(vhost.url)
        workers = _start_workers(label, count, settings, folder, other_hosts=other_hosts)
        try:

            def consuming() -> bool:
                for worker in workers:
                    worker.check_alive()
                found = probe.depth("hub.telemetry")
                return found is not None and found[1] >= count

            wait_until(consuming, 120, f"{count} workers to consume hub.telemetry", interval_s=0.3)
            batches, unique = _batches(cfg, datetime.now(UTC))
            cpu0 = sum(w.cpu_s() for w in workers)
            began = time.monotonic()
            app = _publisher(settings)
            with app.producer_or_acquire() as producer:
                for batch in batches:
                    app.send_task(
                        "tasks.ingest.telemetry",
                        args=[batch],
                        queue="hub.telemetry",
                        producer=producer,
                    )
            published_s = time.monotonic() - began

            def stored() -> int:
                with engine.connect() as conn:
                    return int(conn.execute(text("SELECT count(*) FROM telemetry")).scalar_one())

            def drained() -> bool:
                for worker in workers:
                    worker.check_alive()
                found = probe.depth("hub.telemetry")
                return stored() >= unique and found is not None and found[0] == 0

            wait_until(drained, cfg.drain_timeout_s, f"{unique} rows to be stored", interval_s=0.05)
            app.close()
            elapsed = time.monotonic() - began
            cpu_s = sum(w.cpu_s() for w in workers) - cpu0
            time.sleep(1.0)  # a redelivered copy still in a worker's hands would show now
            with engine.connect() as conn:
                rows, distinct = conn.execute(
                    text("SELECT count(*), count(DISTINCT envelope_id) FROM telemetry")
                ).one()
                shares = {
                    str(worker): int(value)
                    for worker, value in conn.execute(
                        select(WorkerCounter.worker, WorkerCounter.value).where(
                            WorkerCounter.name == ROWS_STORED
                        )
                    )
                }
        finally:
            for worker in workers:
                worker.stop()
            probe.close()
            engine.dispose()
    rate = unique / elapsed
    return {
        "label": label,
        "workers": count,
        "other_hosts": other_hosts,
        "task_messages": len(batches),
        "envelopes_published": sum(len(b) for b in batches),
        "unique_envelopes": unique,
        "rows": int(rows),
        "duplicate_rows": int(rows) - int(distinct),
        "missing_rows": unique - int(distinct),
        "publish_s": round(published_s, 2),
        "elapsed_s": round(elapsed, 2),
        "stored_per_s": round(rate, 1),
        "stored_per_s_per_worker": round(rate / count, 1),
        "worker_cpu_us_per_row": round(cpu_s / unique * 1e6, 1),
        "rows_by_worker": shares,
    }


def run_workers(cfg: WorkersConfig) -> dict[str, Any]:
    """Every configuration once per round, in the same order each round, so that
    the machine's drifting load falls on all of them alike; medians per configuration."""
    from bench.ingest import machine_info

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        folder = Path(tmp)
        plan = [(f"local{n}", n, False) for n in cfg.counts]
        if cfg.hosts:
            plan.append((f"hosts{cfg.hosts}", cfg.hosts, True))
        for round_n in range(cfg.rounds):
            for label, count, other_hosts in plan:
                if not cfg.quiet:
                    where = (
                        "separate working directories (other hosts)" if other_hosts else "this tree"
                    )
                    log(f"round {round_n + 1}/{cfg.rounds}: {count} worker(s) from {where}")
                run_folder = folder / f"{label}-{round_n}"
                run_folder.mkdir()
                run = _run_one(label, count, cfg, run_folder, other_hosts=other_hosts)
                if run["duplicate_rows"] or run["missing_rows"]:
                    raise BenchError(
                        f"{label}: {run['duplicate_rows']} duplicate and "
                        f"{run['missing_rows']} missing rows"
                    )
                run["round"] = round_n + 1
                runs.append(run)
    summary = []
    for label, count, other_hosts in plan:
        rates = sorted(r["stored_per_s"] for r in runs if r["label"] == label)
        cpu = sorted(r["worker_cpu_us_per_row"] for r in runs if r["label"] == label)
        summary.append(
            {
                "label": label,
                "workers": count,
                "other_hosts": other_hosts,
                "stored_per_s_median": statistics.median(rates),
                "stored_per_s_min": rates[0],
                "stored_per_s_max": rates[-1],
                "stored_per_s_per_worker_median": round(statistics.median(rates) / count, 1),
                "worker_cpu_us_per_row_median": statistics.median(cpu),
            }
        )
    return {
        "benchmark": "workers",
        "config": {k: v for k, v in vars(cfg).items() if k != "quiet"},
        "machine": machine_info(),
        "runs": runs,
        "summary": summary,
    }


def workers_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "telemetry stored by N worker processes (solo pool) on PostgreSQL: "
        f"{cfg['batches']} batches of {cfg['batch_size']} from {cfg['devices']} devices, "
        "plus redelivered and retransmitted copies",
        f"{'run':<10} {'workers':>7} {'stored msg/s':>13} {'per worker':>11} {'CPU us/row':>11} "
        f"{'elapsed s':>10} {'dup':>4} {'lost':>5}  rows per worker",
    ]
    for r in result["runs"]:
        shares = ", ".join(str(v) for v in sorted(r["rows_by_worker"].values(), reverse=True))
        lines.append(
            f"{r['label']:<10} {r['workers']:>7} {r['stored_per_s']:>13,.0f} "
            f"{r['stored_per_s_per_worker']:>11,.0f} {r['worker_cpu_us_per_row']:>11.0f} "
            f"{r['elapsed_s']:>10.1f} {r['duplicate_rows']:>4} {r['missing_rows']:>5}  {shares}"
        )
    lines.append("")
    lines.append(
        f"median of {cfg['rounds']} round(s): {'run':<10} {'stored msg/s':>13} "
        f"{'min-max':>15} {'per worker':>11} {'CPU us/row':>11}"
    )
    for s in result["summary"]:
        spread = f"{s['stored_per_s_min']:,.0f}-{s['stored_per_s_max']:,.0f}"
        lines.append(
            f"{'':<19} {s['label']:<10} {s['stored_per_s_median']:>13,.0f} {spread:>15} "
            f"{s['stored_per_s_per_worker_median']:>11,.0f} "
            f"{s['worker_cpu_us_per_row_median']:>11.0f}"
        )
    return "\n".join(lines)


def plot_workers(result: dict[str, Any], path: Path) -> None:
    """Stored msg/s (all, and per worker) against the number of worker processes."""
    from bench.plot import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = [r for r in result["summary"] if not r["other_hosts"]]
    hosts = [r for r in result["summary"] if r["other_hosts"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [r["workers"] for r in local]
    medians = [r["stored_per_s_median"] for r in local]
    spread = [
        [m - r["stored_per_s_min"] for m, r in zip(medians, local, strict=True)],
        [r["stored_per_s_max"] - m for m, r in zip(medians, local, strict=True)],
    ]
    ax.errorbar(xs, medians, yerr=spread, fmt="o-", capsize=4,
                label="stored, all workers (median, min-max)")  # fmt: skip
    ax.plot(xs, [r["stored_per_s_per_worker_median"] for r in local], "o--",
            label="stored per worker (median)")  # fmt: skip
    for r in hosts:
        label = f"{r['workers']} workers as other hosts (own cwd, data, host name)"
        ax.plot([r["workers"]], [r["stored_per_s_median"]], "s", color="#d62728", label=label)
    cfg, machine = result["config"], result["machine"]
    ax.set_title(
        f"Telemetry stored vs worker processes (PostgreSQL, solo pool)\n"
        f"{cfg['batches']} batches of {cfg['batch_size']}, {cfg['rounds']} rounds, "
        f"{machine['cpus']} CPUs shared "
        "with RabbitMQ, PostgreSQL and other work",
        fontsize=9,
    )
    ax.set_xlabel("worker processes")
    ax.set_ylabel("messages stored per second")
    ax.set_xticks(sorted({r["workers"] for r in result["summary"]}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
