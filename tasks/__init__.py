"""The Celery side: `celery -A tasks worker` starts a worker.

Layer: tasks; imports the `hub` core and `localqueue`, never `bridges`,
`console`, `firmware_sim` or the root `hubapp` (bridges send tasks by name).
Configuration comes from the same settings as the hub (TOML file and `HUB_*`
variables), so the worker finds the same broker and database.

- `tasks.application`: the Celery app, its configuration and the frozen
  `WorkerContext` (settings and worker name) built at start.
- `tasks.ingest`, `tasks.commands`, `tasks.handlers`, `tasks.dead_letters`:
  the built-in tasks and the registry of users' handlers.
- `tasks.worker`: the in-hub worker and the one builder of every worker's
  command line and environment (used by the hub, the tests and the benchmarks).

`app` and `send_command` are loaded on first use (PEP 562), so that a process
that only builds a worker's command line (the hub) does not create the Celery
app or read the worker's settings from its own environment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.application import app
    from tasks.commands import send_command

__all__ = ["app", "send_command"]

_LAZY = {"app": "tasks.application", "send_command": "tasks.commands"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
