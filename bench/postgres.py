"""A PostgreSQL database of a benchmark's own on the machine's server, dropped afterwards.

Layer: benchmarks; may import anything.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from bench.services import LOCALHOST, BenchError, port_open

POSTGRES_PORT = 5432
ADMIN_DSN = f"host={LOCALHOST} port={POSTGRES_PORT} user=postgres dbname=postgres"


@contextlib.contextmanager
def postgres_database(label: str) -> Iterator[str]:
    """Yield the SQLAlchemy URL of a new, empty database; dropped at the end (also on Ctrl+C)."""
    if not port_open(LOCALHOST, POSTGRES_PORT):
        raise BenchError(
            f"PostgreSQL is not reachable on {LOCALHOST}:{POSTGRES_PORT} (user postgres); "
            "start it (Debian: `service postgresql start`)"
        )
    import psycopg

    name = f"bench_{label}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{LOCALHOST}:{POSTGRES_PORT}/{name}"
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
