"""Order of device state: when each value and state key was set, and the newest presence.

Batches are stored in any order (separate queues, parallel workers, a spool
replayed late), so each device's state row keeps the stamps that decide what
is newer (hub/presence.py).

Revision ID: 0003_presence_order
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_presence_order"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
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
