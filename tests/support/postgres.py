"""A PostgreSQL database of a test's own on the machine's server, dropped afterwards.

Nothing skips: a server that does not answer fails the test with what to start.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.services import port_open

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
START_POSTGRES = (
    "start PostgreSQL on 127.0.0.1:5432 with a `postgres` user that may connect "
    "(Debian: `apt-get install -y postgresql`, then `service postgresql start`)"
)


@contextmanager
def postgres_database() -> Iterator[str]:
    """Yield the URL (`postgresql://...`, as users write it) of a new, empty database."""
    if not port_open(POSTGRES_HOST, POSTGRES_PORT):
        pytest.fail(f"PostgreSQL is not reachable: {START_POSTGRES}")
    import psycopg

    name = f"hub_test_{uuid.uuid4().hex[:12]}"
    admin = f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
