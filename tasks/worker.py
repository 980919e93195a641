"""Worker processes: the in-hub worker, and the one builder of every worker's command line.

Layer: tasks; imports the `hub` core only (the Celery app only inside `main`,
so that the hub can build a worker's command line without creating it).

`worker_command`, `celery_worker_command` and `worker_environment` are the one
place that spells out how a worker process is started: the hub's supervisor,
the tests and the benchmarks all use them.

The in-hub worker is `python -m tasks.worker [--check]`, the child `hub run`
supervises.

It checks its configuration before it serves: the settings from its
environment (the hub passes its own validated values, see
`Settings.to_environment`) and the handler modules they name. A configuration
error is one line on stderr and exit status `EXIT_CONFIG`, which the hub's
supervisor takes as "stop, do not restart"; with `--check` it stops after the
check. Then it runs a Celery worker on the solo pool: one task at a time in
this process, so SIGTERM is a warm shutdown that lets the task in hand finish,
and the messages it was handed but had not started go back to the queue.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hub.errors import EXIT_CONFIG, ConfigError

if TYPE_CHECKING:
    from hub.settings import Settings

WORKER_ARGV = [
    "worker",
    "--pool=solo",
    "--loglevel=WARNING",
    "--without-gossip",
    "--without-mingle",
]


def worker_command(*options: str) -> list[str]:
    """The in-hub worker's command line (its Celery options are `WORKER_ARGV`)."""
    return [sys.executable, "-m", "tasks.worker", *options]


def celery_worker_command(
    *,
    app: str = "tasks",
    concurrency: int | None = None,
    pool: str | None = None,
    queues: Sequence[str] = (),
    hostname: str | None = None,
    loglevel: str = "WARNING",
    heartbeat: bool = True,
) -> list[str]:
    """`celery -A tasks worker` with the options the hub's workers always take
    (no gossip, no mingle: workers do not need each other), and those asked for.
    `app` names another Celery app (a benchmark's baseline)."""
    argv = [sys.executable, "-m", "celery", "-A", app, "worker"]
    if queues:
        argv += ["-Q", ",".join(queues)]
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    if pool is not None:
        argv.append(f"--pool={pool}")
    argv += [f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    if not heartbeat:
        argv.append("--without-heartbeat")
    if hostname is not None:
        argv.append(f"--hostname={hostname}")
    return argv


def worker_environment(
    settings: Settings,
    *,
    base: Mapping[str, str] | None = None,
    python_path: Sequence[str] = (),
) -> dict[str, str]:
    """A worker's environment: `base` (default: ours) without any `HUB_*`, then
    every validated setting.

    So the worker sees exactly these settings, whether they came from the
    file, the variables or command-line options, and nothing a stale variable
    says. `python_path` becomes PYTHONPATH (tests and benchmarks run from a
    source tree).
    """
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("HUB_")}
    env.update(settings.to_environment())
    env["PYTHONUNBUFFERED"] = "1"  # its log as it happens
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(python_path)
    return env


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from tasks import handlers
        from tasks.application import app, context

        handlers.load(context().settings.handlers)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if "--check" in args:
        return 0
    app.worker_main(WORKER_ARGV)
    return 0


if __name__ == "__main__":
    sys.exit(main())
