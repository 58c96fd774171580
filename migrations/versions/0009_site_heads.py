"""Site heads (cxr-node adapt-site): a station's logistic heads on the model's frozen features, versioned,
bound to the weights' sha256.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "site_heads",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("station", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("heads", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("retired_at", UTC),
        sa.UniqueConstraint("station", "version", name="uq_site_head_version"),
    )
    op.create_index("ix_site_heads_station", "site_heads", ["station"])
    op.create_index("ix_site_heads_active", "site_heads", ["active"])


def downgrade() -> None:
    op.drop_index("ix_site_heads_active", "site_heads")
    op.drop_index("ix_site_heads_station", "site_heads")
    op.drop_table("site_heads")
