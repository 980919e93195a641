"""The Celery app: `celery -A tasks worker` starts a worker.

Layer: tasks; imports the `hub` core, never `bridges` (bridges send tasks by
name). Configuration comes from the same settings as the hub (TOML file and
`HUB_*` variables), so the worker finds the same broker and database.
"""

from tasks.application import app
from tasks.commands import send_command

__all__ = ["app", "send_command"]
