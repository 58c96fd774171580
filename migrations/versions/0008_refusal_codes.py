"""image_results.refusal_code: why a film was not analysed, as the code the rule made
(cxr_node.eligibility.refusal.RefusalCode), so that no reader has to match the reason's words.

Rows written before this revision are backfilled by the phrase matching the node used until then
(frozen here, as it was: this migration must mean the same thing forever, whatever the rules'
texts become).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: The phrase -> kind table of cxr_node.eligibility.category() as it stood at revision 0007 (with a
#: body part other than chest told apart from a view other than frontal, as the codes do).
_CATEGORIES = (("unusable header", "unreadable"), ("SOP class", "sop_class"), ("BodyPartExamined", "not_chest"),
               ("ViewPosition", "header"), ("unusable pixels", "pixels"), ("cannot read", "unreadable"),
               ("outside the training distribution", "out_of_domain"), ("lung field", "no_lung_fields"),
               ("lung area", "no_lung_fields"), ("lung shape", "no_lung_fields"), ("one lung", "no_lung_fields"))


def _code(reason):
    return next((c for phrase, c in _CATEGORIES if reason and phrase in reason), "other")


def upgrade() -> None:
    with op.batch_alter_table("image_results") as b:
        b.add_column(sa.Column("refusal_code", sa.String(32)))
        b.create_index("ix_image_results_refusal_code", ["refusal_code"])
    conn = op.get_bind()
    results = sa.table("image_results", sa.column("id", sa.Integer), sa.column("analysed", sa.Boolean),
                       sa.column("reason", sa.Text), sa.column("refusal_code", sa.String(32)))
    rows = conn.execute(sa.select(results.c.reason).where(results.c.analysed.is_(False))
                        .group_by(results.c.reason)).all()
    for (reason,) in rows:  # one UPDATE per distinct reason text, not per row
        cond = results.c.reason.is_(None) if reason is None else results.c.reason == reason
        conn.execute(results.update().where(results.c.analysed.is_(False), cond).values(refusal_code=_code(reason)))


def downgrade() -> None:
    with op.batch_alter_table("image_results") as b:
        b.drop_index("ix_image_results_refusal_code")
        b.drop_column("refusal_code")
