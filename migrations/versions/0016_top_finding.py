"""image_results.finding / finding_probability: the finding a worklist row names for a film, stored as
data at triage time (cxr_node.encode.wording.top_finding): "abnormal" with p(abnormal) for a model with an
abnormality output, else the class that raised the flag, the most probable pattern of a review call, or
the top class. Until now the console parsed it out of the image.triaged audit reason with a regex.

The backfill reads each analysed row's own columns, never the audit text: p(abnormal) where 0010 stored
one; else, for an urgent or review call, its most probable non-normal class (the operating points a v2
flag was compared with were not stored, so a flagged film with two classes above theirs names the more
probable one); else the top class.

Revision ID: 0016
Revises: 0014
Create Date: 2026-12-06
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0014"
branch_labels = None
depends_on = None

_NORMAL = ("normal", "no finding", "no_finding")


def backfill_value(abnormal, priority, top_label, probabilities):
    """(finding, probability) for one existing analysed row."""
    if abnormal is not None:
        return "abnormal", float(abnormal)
    probs = probabilities if isinstance(probabilities, dict) else json.loads(probabilities or "{}")
    probs = {str(k): float(v) for k, v in (probs or {}).items()}
    if not probs:
        return None, None
    if priority in ("urgent", "review"):
        flagged = {k: v for k, v in probs.items() if k.strip().lower() not in _NORMAL}
        if flagged:
            label = max(flagged, key=flagged.get)
            return label, flagged[label]
    label = top_label if top_label in probs else max(probs, key=probs.get)
    return label, probs[label]


def upgrade() -> None:
    with op.batch_alter_table("image_results") as b:
        b.add_column(sa.Column("finding", sa.String(64), nullable=True))
        b.add_column(sa.Column("finding_probability", sa.Float(), nullable=True))
    conn = op.get_bind()
    t = sa.table("image_results", sa.column("id", sa.Integer), sa.column("analysed", sa.Boolean),
                 sa.column("abnormal", sa.Float), sa.column("priority", sa.String), sa.column("top_label", sa.String),
                 sa.column("probabilities", sa.JSON), sa.column("finding", sa.String),
                 sa.column("finding_probability", sa.Float))
    rows = conn.execute(sa.select(t.c.id, t.c.abnormal, t.c.priority, t.c.top_label, t.c.probabilities)
                        .where(t.c.analysed.is_(True))).all()
    for rid, abnormal, priority, top, probs in rows:
        finding, p = backfill_value(abnormal, priority, top, probs)
        if finding is not None:
            conn.execute(t.update().where(t.c.id == rid).values(finding=finding[:64], finding_probability=p))


def downgrade() -> None:
    with op.batch_alter_table("image_results") as b:
        b.drop_column("finding_probability")
        b.drop_column("finding")
