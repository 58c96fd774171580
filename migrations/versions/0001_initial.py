"""Audit events, studies and instances.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("association_id", sa.String(36)),
        sa.Column("calling_aet", sa.String(16)),
        sa.Column("called_aet", sa.String(16)),
        sa.Column("host", sa.String(64)),
        sa.Column("port", sa.Integer),
        sa.Column("study_uid", sa.String(64)),
        sa.Column("series_uid", sa.String(64)),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("transfer_syntax", sa.String(64)),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("status", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.Column("detail", sa.JSON),
    )
    for col in ("ts", "event", "association_id", "calling_aet", "study_uid", "sop_instance_uid", "patient_id"):
        op.create_index(f"ix_audit_events_{col}", "audit_events", [col])

    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])

    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("triage_eligible", sa.Boolean, nullable=False),
        sa.Column("not_for_triage_reason", sa.Text),
        sa.Column("study_version", sa.Integer, nullable=False),
        sa.Column("association_id", sa.String(36)),
        sa.Column("calling_aet", sa.String(16)),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_instances_study_uid", "instances", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_instances_study_uid", "instances")
    op.drop_table("instances")
    op.drop_index("ix_studies_last_received_at", "studies")
    op.drop_index("ix_studies_state", "studies")
    op.drop_table("studies")
    for col in ("ts", "event", "association_id", "calling_aet", "study_uid", "sop_instance_uid", "patient_id"):
        op.drop_index(f"ix_audit_events_{col}", "audit_events")
    op.drop_table("audit_events")
