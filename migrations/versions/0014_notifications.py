"""Urgent notifications (HL7 v2 ORU^R01 over MLLP, FHIR R4): one row per study version and channel,
durable and retried like the outbox; the C-STORE request's Priority of each instance (the node
never sends a priority lower than one the study carries from upstream).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("call", sa.String(16), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("correction", sa.Boolean(), nullable=False),
        sa.Column("control_id", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTC, nullable=False),
        sa.Column("last_status", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("sent_at", UTC),
        sa.Column("removed_at", UTC),
        sa.UniqueConstraint("study_uid", "study_version", "channel", name="uq_notification_version_channel"),
    )
    op.create_index("ix_notifications_study_uid", "notifications", ["study_uid"])
    op.create_index("ix_notifications_state", "notifications", ["state"])
    op.create_index("ix_notifications_next_attempt_at", "notifications", ["next_attempt_at"])
    with op.batch_alter_table("instances") as b:
        b.add_column(sa.Column("dimse_priority", sa.Integer()))


def downgrade() -> None:
    with op.batch_alter_table("instances") as b:
        b.drop_column("dimse_priority")
    op.drop_index("ix_notifications_next_attempt_at", "notifications")
    op.drop_index("ix_notifications_state", "notifications")
    op.drop_index("ix_notifications_study_uid", "notifications")
    op.drop_table("notifications")
