"""Order of device state: when each value and state key was set, the newest presence,
and a row per state report.

Batches are stored in any order (separate queues, parallel workers, a spool
replayed late), so each device's state row keeps the stamps that decide what
is newer (hub/presence.py), and state reports get rows keyed by envelope id,
like telemetry, so that a retransmitted one changes nothing.

Revision ID: 0004_presence_order
Revises: 0003_dead_letters
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_presence_order"
down_revision = "0003_dead_letters"
branch_labels = None
depends_on = None


def _message_columns() -> list[sa.Column]:
    return [
        sa.Column("envelope_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=True),
        sa.Column("device_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("protocol", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
    ]


def upgrade() -> None:
    op.create_table("state_reports", *_message_columns())
    op.create_index(
        "ix_state_reports_device_received", "state_reports", ["device_id", "received_at"]
    )
    with op.batch_alter_table("device_state") as table:
        table.add_column(sa.Column("last_values_at", sa.JSON, nullable=True))
        table.add_column(sa.Column("state_at", sa.JSON, nullable=True))
        table.add_column(sa.Column("presence_since", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("presence_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_state") as table:
        table.drop_column("presence_at")
        table.drop_column("presence_since")
        table.drop_column("state_at")
        table.drop_column("last_values_at")
    op.drop_table("state_reports")
