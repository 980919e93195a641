"""Dead letters in the database, and worker counters that the hub reads.

Revision ID: 0003_dead_letters
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_dead_letters"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("envelope_id", sa.String(64), nullable=True),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("task_name", sa.String(200), nullable=True),
        sa.Column("task_args", sa.Text, nullable=True),
    )
    op.create_index("ix_dead_letters_status_created", "dead_letters", ["status", "created_at"])
    op.create_table(
        "worker_counters",
        sa.Column("worker", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_counters")
    op.drop_index("ix_dead_letters_status_created", "dead_letters")
    op.drop_table("dead_letters")
