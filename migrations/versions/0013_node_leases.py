"""Node leases (issue 27): a row per node with its heartbeat, and the node holding each outbox item,
so that another node takes over what a dead node held.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(16)),
        sa.Column("version", sa.String(32)),
        sa.Column("data_dir", sa.Text(), nullable=False),
        sa.Column("marker", sa.String(255), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("started_at", UTC, nullable=False),
        sa.Column("heartbeat_at", UTC, nullable=False),
        sa.Column("stopped_at", UTC),
    )
    op.create_index("ix_nodes_heartbeat_at", "nodes", ["heartbeat_at"])
    with op.batch_alter_table("outbox") as b:
        b.add_column(sa.Column("claimed_by", sa.String(128)))
        b.create_index("ix_outbox_claimed_by", ["claimed_by"])


def downgrade() -> None:
    with op.batch_alter_table("outbox") as b:
        b.drop_index("ix_outbox_claimed_by")
        b.drop_column("claimed_by")
    op.drop_index("ix_nodes_heartbeat_at", "nodes")
    op.drop_table("nodes")
