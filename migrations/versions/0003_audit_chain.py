"""Hash chain over the audit trail: prev_hash and hash per row, and the chain head.

Existing rows are chained in id order during the upgrade.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from cxr_node.audit.trail import GENESIS, chain_hash

    with op.batch_alter_table("audit_events") as b:
        b.add_column(sa.Column("prev_hash", sa.String(64)))
        b.add_column(sa.Column("hash", sa.String(64)))
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_id", sa.Integer),
        sa.Column("last_hash", sa.String(64), nullable=False),
    )
    conn = op.get_bind()
    events = sa.table("audit_events", *(sa.column(c) for c in (
        "id", "ts", "event", "outcome", "association_id", "calling_aet", "called_aet", "host", "port", "study_uid",
        "series_uid", "sop_instance_uid", "sop_class_uid", "patient_id", "transfer_syntax", "bytes", "status",
        "reason", "prev_hash", "hash")), sa.column("detail", sa.JSON), sa.column("ts", sa.DateTime(timezone=True)))
    prev, last_id = GENESIS, None
    for row in conn.execute(sa.select(events).order_by(events.c.id)).mappings():
        h = chain_hash(prev, dict(row))
        conn.execute(events.update().where(events.c.id == row["id"]).values(prev_hash=prev, hash=h))
        prev, last_id = h, row["id"]
    op.bulk_insert(head, [{"id": 1, "last_id": last_id, "last_hash": prev}])


def downgrade() -> None:
    op.drop_table("audit_chain_head")
    with op.batch_alter_table("audit_events") as b:
        b.drop_column("hash")
        b.drop_column("prev_hash")
