"""removed_at on instances and outbox rows (retention deleted the file); studies.claimed_by.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("instances", "outbox"):
        with op.batch_alter_table(table) as b:
            b.add_column(sa.Column("removed_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("studies") as b:
        b.add_column(sa.Column("claimed_by", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.drop_column("claimed_by")
    for table in ("outbox", "instances"):
        with op.batch_alter_table(table) as b:
            b.drop_column("removed_at")
