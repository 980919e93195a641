"""The in-hub worker: `python -m tasks.worker [--check]`, the child `hub run` supervises.

Layer: tasks; imports the `hub` core only.

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

import sys

from hub.errors import EXIT_CONFIG, ConfigError

WORKER_ARGV = [
    "worker",
    "--pool=solo",
    "--loglevel=WARNING",
    "--without-gossip",
    "--without-mingle",
]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from tasks import handlers
        from tasks.application import app, settings

        handlers.load(settings.handlers)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if "--check" in args:
        return 0
    app.worker_main(WORKER_ARGV)
    return 0


if __name__ == "__main__":
    sys.exit(main())
