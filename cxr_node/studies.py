"""The study state machine: every state, every transition, and who makes it, in one module.

    receiving --(quiet for quiet_seconds)--> complete --> queued --(claimed by a worker)--> processing
    processing --> processed | failed            (the pipeline, cxr_node.pipeline)
    processing --> queued                        (start-up: processing was interrupted)
    any state but receiving --(an instance arrives)--> receiving, version + 1   (study.reopened)
    processed | failed --(cxr-node reprocess)--> queued, version + 1

The database is the only state: after a restart every study resumes from its persisted state
and its persisted ``last_received_at``. Every transition is audited as ``study.<new state>``
(``study.reopened`` for a reopening) with ``detail.from``/``to``/``version``. Retention removes
only studies in a :data:`FINISHED` state.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxr_node import audit
from cxr_node.db.models import Instance, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import CxrNodeError

log = logging.getLogger(__name__)

RECEIVING = "receiving"
COMPLETE = "complete"
QUEUED = "queued"
PROCESSING = "processing"
PROCESSED = "processed"
FAILED = "failed"
STATES = (RECEIVING, COMPLETE, QUEUED, PROCESSING, PROCESSED, FAILED)
FINISHED = (PROCESSED, FAILED)
#: Allowed transitions (a reopening, any state -> receiving, is separate: it starts a new version).
TRANSITIONS = {RECEIVING: (COMPLETE,), COMPLETE: (QUEUED,), QUEUED: (PROCESSING,),
               PROCESSING: (PROCESSED, FAILED, QUEUED), PROCESSED: (QUEUED,), FAILED: (QUEUED,)}


def move(session: Session, study: Study, new: str, *, reason: str | None = None, **detail) -> None:  # noqa: ANN003
    """Change ``study``'s state (an allowed transition) and audit it, in the caller's transaction."""
    old = study.state
    if new not in TRANSITIONS.get(old, ()):
        raise ValueError(f"study {study.study_uid}: {old} -> {new} is not a transition of the study state machine")
    study.state, study.state_changed_at = new, utcnow()
    audit.record(session, f"study.{new}", "failure" if new == FAILED else "success", study_uid=study.study_uid, patient_id=study.patient_id, reason=reason,
                 detail={"from": old, "to": new, "version": study.version, **detail})


def note_instance(session: Session, study_uid: str, patient_id: str | None, now: dt.datetime,
                  association_id: str | None = None) -> int:
    """Record that an instance of ``study_uid`` arrived; returns the study version it joins.

    Runs inside the caller's transaction, together with the instance row.
    """
    study = session.get(Study, study_uid, with_for_update=True)
    if study is None:
        study = Study(study_uid=study_uid, state=RECEIVING, version=1, patient_id=patient_id,
                      instance_count=0, first_received_at=now, last_received_at=now, state_changed_at=now)
        session.add(study)
        audit.record(session, "study.receiving", ts=now, study_uid=study_uid, patient_id=patient_id,
                     association_id=association_id, detail={"version": 1})
    elif study.state != RECEIVING:
        previous = study.state
        study.version += 1
        study.state = RECEIVING
        study.state_changed_at = now
        audit.record(session, "study.reopened", ts=now, study_uid=study_uid, patient_id=study.patient_id,
                     association_id=association_id,
                     reason=f"instance arrived while the study was {previous}",
                     detail={"from": previous, "to": RECEIVING, "version": study.version})
        log.info("study %s reopened as version %d (was %s)", study_uid, study.version, previous)
    study.instance_count += 1
    study.last_received_at = now
    return study.version


def complete_quiet_studies(db: Database, quiet_seconds: float) -> list[str]:
    """Move every study quiet for ``quiet_seconds`` to complete, then queued. Returns their UIDs."""
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    done = []
    with db.transaction() as s:
        studies = s.scalars(
            select(Study).where(Study.state == RECEIVING, Study.last_received_at <= cutoff).with_for_update()
        ).all()
        for st in studies:
            for new in (COMPLETE, QUEUED):
                move(s, st, new, instances=st.instance_count)
            done.append(st.study_uid)
    for uid in done:
        log.info("study %s complete after %gs quiet; queued", uid, quiet_seconds)
    return done


def claim(db: Database, limit: int, node_id: str) -> list[tuple[str, int]]:
    """Atomically move up to ``limit`` queued studies to processing, for ``node_id``."""
    out = []
    with db.transaction() as s:
        q = select(Study).where(Study.state == QUEUED).order_by(Study.state_changed_at).limit(limit)
        if db.engine.dialect.name != "sqlite":
            q = q.with_for_update(skip_locked=True)
        for st in s.scalars(q):
            st.claimed_by = node_id
            move(s, st, PROCESSING, node=node_id)
            out.append((st.study_uid, st.version))
    return out


def requeue_interrupted(db: Database, node_id: str) -> int:
    """At start-up: studies a crash left in processing (claimed by this node) go back to queued."""
    n = 0
    with db.transaction() as s:
        for st in s.scalars(select(Study).where(Study.state == PROCESSING, Study.claimed_by == node_id)
                            .with_for_update()):
            move(s, st, QUEUED, reason="processing was interrupted; queued again at start-up")
            n += 1
    return n


def finish(session: Session, study: Study, version: int, **detail) -> bool:
    """processing -> processed for ``version``; False (nothing changed) if the study moved on meanwhile
    (reopened by a late instance: that version will be processed in its turn)."""
    if study.state != PROCESSING or study.version != version:
        return False
    move(session, study, PROCESSED, **detail)
    return True


def fail(db: Database, study_uid: str, version: int, reason: str) -> None:
    with db.transaction() as s:
        st = s.get(Study, study_uid, with_for_update=True)
        if st is not None and st.state == PROCESSING and st.version == version:
            st.last_error = reason
            move(s, st, FAILED, reason=reason)
        else:
            audit.record(s, "study.failed", "failure", study_uid=study_uid, reason=reason, detail={"version": version})
    log.error("study %s v%d failed: %s", study_uid, version, reason)


def reprocess(db: Database, study_uid: str) -> int:
    """``cxr-node reprocess``: queue a finished study for analysis as a new version (no quiet period,
    nothing new arrives); the new SR then names the previous one. Returns the version. Audited as
    ``study.reprocess``. Raises CxrNodeError, saying why, for an unknown or unfinished study or
    one whose films retention has removed."""
    with db.transaction() as s:
        st = s.get(Study, study_uid, with_for_update=True)
        if st is None:
            raise CxrNodeError(f"study {study_uid}: not known to this node (check the UID, and --config)")
        if st.state not in FINISHED:
            raise CxrNodeError(f"study {study_uid} is {st.state}: it is being received or analysed already; "
                               "reprocess it once it is processed or failed")
        films = s.scalar(select(func.count()).select_from(Instance).where(
            Instance.study_uid == study_uid, Instance.removed_at.is_(None)))
        if not films:
            raise CxrNodeError(f"study {study_uid}: its films are no longer in the spool (retention removed "
                               "them); send the study again to have it analysed")
        previous, now = st.state, utcnow()
        st.version += 1
        st.state, st.state_changed_at, st.claimed_by = QUEUED, now, None
        audit.record(s, "study.reprocess", ts=now, study_uid=study_uid, patient_id=st.patient_id,
                     reason="requested by an admin (cxr-node reprocess)",
                     detail={"from": previous, "to": QUEUED, "version": st.version, "films": films})
        version = st.version
    log.info("study %s queued for analysis again as version %d", study_uid, version)
    return version


def finished_since(db: Database, since: dt.datetime) -> list[str]:
    """Processed or failed studies that received an instance at or after ``since``, oldest first."""
    with db.session() as s:
        return list(s.scalars(select(Study.study_uid).where(Study.state.in_(FINISHED),
                                                            Study.last_received_at >= since)
                              .order_by(Study.last_received_at)))
