"""The handler-run ledger: one row per (envelope, handler) that ran to the end.

A handler run delivered twice (a worker killed after the run, before its
acknowledgement; a batch redelivered after it was stored, whose runs are then
scheduled again) finds its row and is skipped. A handler that writes through
`tasks.handlers.transaction()` commits together with its row: exactly once.

Revision ID: 0006_handler_runs
Revises: 0005_console
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_handler_runs"
down_revision = "0005_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "handler_runs",
        sa.Column("envelope_id", sa.String(64), primary_key=True),
        sa.Column("handler", sa.String(255), primary_key=True),
        sa.Column("ran_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("handler_runs")
