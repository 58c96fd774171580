"""Putting dead (or pending) rows back to pending, due now, attempts reset: what `cxr-node outbox retry`
and the console's retry do for outbox items and for notifications alike."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from sqlalchemy import select

from cxr_node.audit import trail as audit
from cxr_node.db.models import utcnow

DEAD, PENDING = "dead", "pending"


def requeue(db, model: Any, event: str, detail: Callable[[Any], dict], ids: Sequence[int] = (),
            all_dead: bool = False, by: str | None = None) -> int:
    """Rows of ``model`` named by ``ids`` (dead or pending), or every dead one with ``all_dead``; each
    audited as ``event`` with ``detail(row)`` (plus ``user``: the console user who asked). Returns how many."""
    n = 0
    with db.transaction() as s:
        q = select(model).where(model.state.in_([DEAD, PENDING]))
        if ids:
            q = q.where(model.id.in_(list(ids)))
        elif all_dead:
            q = q.where(model.state == DEAD)
        else:
            return 0
        for row in s.scalars(q.with_for_update()):
            row.state, row.attempts, row.next_attempt_at = PENDING, 0, utcnow()
            audit.record(s, event, study_uid=row.study_uid,
                         **({"sop_instance_uid": row.sop_instance_uid} if hasattr(row, "sop_instance_uid") else {}),
                         detail={**detail(row), **({"user": by} if by else {})})
            n += 1
    return n
