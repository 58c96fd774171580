"""image_results.abnormal: p(abnormal), the v5 model's abnormality output (NULL for models without it).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("image_results") as b:
        b.add_column(sa.Column("abnormal", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image_results") as b:
        b.drop_column("abnormal")
