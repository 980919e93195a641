"""Alembic environment for the hub's schema.

Layer: core (storage). Run through `hub.storage.migrate`, which hands in an
open connection; `alembic` on the command line works too with `-x url=...`.
"""

from alembic import context
from sqlalchemy import create_engine

from hub.storage import Base

config = context.config
target_metadata = Base.metadata

connection = config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
