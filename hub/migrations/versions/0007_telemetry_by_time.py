"""Telemetry keyed by time, partitioned by day on PostgreSQL; upkeep leases.

The key of `telemetry` becomes (received_at, envelope_id): new rows land at
the end of its index, so an insert costs the same in a large table as in a
small one (the envelope id alone, a hash, put each insert on a random page).
An index on (device_id, seq) finds a device's retransmission of a message
(hub/storage.py, `_insert_telemetry`).

On PostgreSQL the table becomes partitioned by range of `received_at`, one
partition per UTC day and a default partition; the existing table is renamed,
its rows are copied into the new one (partitions made for every day they
cover) and it is dropped. The copy runs inside the migration's transaction:
on a large table it takes as long as copying the table, while the other
processes starting wait on the migration lock. On SQLite the table is
rebuilt with the new key the same way.

Also: `maintenance_leases` (one row per periodic job, hub/upkeep.py) and an
index on `handler_runs.ran_at` for its retention.

Revision ID: 0007_telemetry_by_time
Revises: 0006_handler_runs
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from hub.upkeep import create_default_partition, ensure_partitions, upcoming_days

revision = "0007_telemetry_by_time"
down_revision = "0006_handler_runs"
branch_labels = None
depends_on = None

COLUMNS = (
    "received_at, envelope_id, device_id, seq, device_time, stored_at, transport, protocol, payload"
)


def _columns(*, time_key: bool) -> list[sa.Column]:
    return [
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, primary_key=time_key),
        sa.Column("envelope_id", sa.String(64), nullable=False, primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=True),
        sa.Column("device_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("protocol", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
    ]


def _indexes() -> None:
    op.create_index("ix_telemetry_device_received", "telemetry", ["device_id", "received_at"])
    op.create_index("ix_telemetry_device_seq", "telemetry", ["device_id", "seq"])


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # Index and constraint names are per schema: the old ones step aside.
        op.execute("ALTER TABLE telemetry RENAME TO telemetry_unpartitioned")
        op.execute("ALTER TABLE telemetry_unpartitioned RENAME CONSTRAINT telemetry_pkey TO telemetry_unpartitioned_pkey")
        op.execute("ALTER INDEX ix_telemetry_device_received RENAME TO ix_telemetry_unpartitioned_device_received")
        op.create_table(
            "telemetry",
            *_columns(time_key=True),
            sa.PrimaryKeyConstraint("received_at", "envelope_id", name="telemetry_pkey"),
            postgresql_partition_by="RANGE (received_at)",
        )
        _indexes()
        connection = op.get_bind()
        create_default_partition(connection)
        days = [
            row[0].date()
            for row in connection.execute(
                sa.text(
                    "SELECT DISTINCT date_trunc('day', received_at AT TIME ZONE 'UTC') "
                    "FROM telemetry_unpartitioned"
                )
            )
        ]
        ensure_partitions(connection, days + upcoming_days(datetime.now(UTC)))
        op.execute(
            f"INSERT INTO telemetry ({COLUMNS}) SELECT {COLUMNS} FROM telemetry_unpartitioned"
        )
        op.drop_table("telemetry_unpartitioned")
    else:
        op.create_table("telemetry_by_time", *_columns(time_key=True))
        op.execute(f"INSERT INTO telemetry_by_time ({COLUMNS}) SELECT {COLUMNS} FROM telemetry")
        op.drop_table("telemetry")
        op.rename_table("telemetry_by_time", "telemetry")
        _indexes()
    op.create_table(
        "maintenance_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
    )
    op.create_index("ix_handler_runs_ran_at", "handler_runs", ["ran_at"])


def downgrade() -> None:
    op.drop_index("ix_handler_runs_ran_at", "handler_runs")
    op.drop_table("maintenance_leases")
    op.create_table("telemetry_by_id", *_columns(time_key=False))
    # One row per envelope id again: the first copy of each.
    op.execute(
        f"INSERT INTO telemetry_by_id ({COLUMNS}) SELECT {COLUMNS} FROM telemetry "
        "WHERE true ORDER BY received_at ON CONFLICT DO NOTHING"
    )
    op.drop_table("telemetry")  # on PostgreSQL, its partitions with it
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry_by_id RENAME CONSTRAINT telemetry_by_id_pkey TO telemetry_pkey")
    op.rename_table("telemetry_by_id", "telemetry")
    op.create_index("ix_telemetry_device_received", "telemetry", ["device_id", "received_at"])
