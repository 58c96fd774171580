"""studies.attempts and studies.retry_at: a study whose processing fails is retried a bounded number
of times with backoff, and a study that keeps crashing the pipeline is not requeued forever.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("retry_at", sa.DateTime(timezone=True)))
        b.create_index("ix_studies_retry_at", ["retry_at"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.drop_index("ix_studies_retry_at")
        b.drop_column("retry_at")
        b.drop_column("attempts")
