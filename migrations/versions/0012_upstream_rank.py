"""studies.upstream_rank: how urgent the sender said the study is (the C-STORE requests' DIMSE
Priority: 0 HIGH, 1 MEDIUM, 2 LOW; the most urgent of the current version's instances), which the
worker claims and schedules first (cxr_node.study.scheduling). NULL (rows before it): MEDIUM.

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.add_column(sa.Column("upstream_rank", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.drop_column("upstream_rank")
