"""Site onboarding: stations (mode, drift), feedback labels, site calibrations; per-image station,
calibration, temperature, out-of-domain score and image statistics; studies.accession_number (feedback
files may name studies by accession number).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("studies") as b:
        b.add_column(sa.Column("accession_number", sa.String(16)))
        b.create_index("ix_studies_accession_number", ["accession_number"])
    with op.batch_alter_table("image_results") as b:
        b.add_column(sa.Column("station", sa.String(64)))
        b.add_column(sa.Column("calibration", sa.String(64)))
        b.add_column(sa.Column("temperature", sa.Float()))
        b.add_column(sa.Column("ood_score", sa.Float()))
        b.add_column(sa.Column("image_stats", sa.JSON()))
        b.create_index("ix_image_results_station", ["station"])
    op.create_table(
        "stations",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("ae_title", sa.String(16)),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("configured", sa.Boolean(), nullable=False),
        sa.Column("mode_since", UTC, nullable=False),
        sa.Column("drift_state", sa.String(8)),
        sa.Column("drift_detail", sa.JSON()),
        sa.Column("drift_checked_at", UTC),
        sa.Column("baseline", sa.JSON()),
        sa.Column("created_at", UTC, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("reader", sa.String(64)),
        sa.Column("labelled_at", UTC, nullable=False),
        sa.Column("recorded_at", UTC, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("superseded_at", UTC),
        sa.Column("superseded_by", sa.Integer()),
    )
    op.create_index("ix_feedback_study_uid", "feedback", ["study_uid"])
    op.create_index("ix_feedback_superseded_at", "feedback", ["superseded_at"])
    op.create_table(
        "site_calibrations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("station", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("reference", sa.JSON()),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("retired_at", UTC),
        sa.UniqueConstraint("station", "version", name="uq_site_calibration_version"),
    )
    op.create_index("ix_site_calibrations_station", "site_calibrations", ["station"])
    op.create_index("ix_site_calibrations_active", "site_calibrations", ["active"])


def downgrade() -> None:
    op.drop_index("ix_site_calibrations_active", "site_calibrations")
    op.drop_index("ix_site_calibrations_station", "site_calibrations")
    op.drop_table("site_calibrations")
    op.drop_index("ix_feedback_superseded_at", "feedback")
    op.drop_index("ix_feedback_study_uid", "feedback")
    op.drop_table("feedback")
    op.drop_table("stations")
    with op.batch_alter_table("image_results") as b:
        b.drop_index("ix_image_results_station")
        for c in ("image_stats", "ood_score", "temperature", "calibration", "station"):
            b.drop_column(c)
    with op.batch_alter_table("studies") as b:
        b.drop_index("ix_studies_accession_number")
        b.drop_column("accession_number")
