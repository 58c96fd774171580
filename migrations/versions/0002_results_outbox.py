"""Per-image results, the outbox, and study processing fields.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.add_column(sa.Column("priority", sa.String(16)))
        b.add_column(sa.Column("processed_version", sa.Integer))
        b.add_column(sa.Column("last_sr_uid", sa.String(64)))
        b.add_column(sa.Column("last_error", sa.Text))

    op.create_table(
        "image_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("study_version", sa.Integer, nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("analysed", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("model_version", sa.String(128)),
        sa.Column("top_label", sa.String(64)),
        sa.Column("urgent", sa.Boolean),
        sa.Column("priority", sa.String(16)),
        sa.Column("probabilities", sa.JSON),
        sa.Column("sc_sop_instance_uid", sa.String(64)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_image_results_study_uid", "image_results", ["study_uid"])
    op.create_index("ix_image_results_sop_instance_uid", "image_results", ["sop_instance_uid"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("study_version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_destination"),
    )
    op.create_index("ix_outbox_destination", "outbox", ["destination"])
    op.create_index("ix_outbox_study_uid", "outbox", ["study_uid"])
    op.create_index("ix_outbox_state", "outbox", ["state"])
    op.create_index("ix_outbox_next_attempt_at", "outbox", ["next_attempt_at"])


def downgrade() -> None:
    for ix in ("next_attempt_at", "state", "study_uid", "destination"):
        op.drop_index(f"ix_outbox_{ix}", "outbox")
    op.drop_table("outbox")
    op.drop_index("ix_image_results_sop_instance_uid", "image_results")
    op.drop_index("ix_image_results_study_uid", "image_results")
    op.drop_table("image_results")
    with op.batch_alter_table("studies") as b:
        b.drop_column("last_error")
        b.drop_column("last_sr_uid")
        b.drop_column("processed_version")
        b.drop_column("priority")
