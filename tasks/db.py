"""The database engine of a worker (or any process using the tasks API).

Layer: tasks; imports the `hub` core only.
"""

from __future__ import annotations

import os

from sqlalchemy import Engine

import tasks.application
from hub.storage import make_engine

_engine: Engine | None = None
_engine_key: tuple[int, str] = (0, "")


def engine() -> Engine:
    """One engine per process and database URL (created after a fork, never inherited)."""
    global _engine, _engine_key
    settings = tasks.application.context().settings
    key = (os.getpid(), settings.effective_database_url)
    if _engine is None or _engine_key != key:
        _engine = make_engine(key[1], pool_size=settings.database_pool_size)
        _engine_key = key
    return _engine
