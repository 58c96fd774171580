"""Instances -> studies. A study is complete when nothing new arrived for ``quiet_seconds``.

The database is the only state: the scheduler job asks it which studies have been quiet long
enough, so after a restart every study simply resumes from its persisted state and its
persisted ``last_received_at``.

States: ``receiving`` -> ``complete`` -> ``queued`` (later stages add processing states).
An instance that arrives for a study in any state but ``receiving`` reopens it as a new version.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_node import audit
from cxr_node.db.models import Study, utcnow
from cxr_node.db.session import Database

log = logging.getLogger(__name__)

RECEIVING = "receiving"
COMPLETE = "complete"
QUEUED = "queued"


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
                old, st.state, st.state_changed_at = st.state, new, utcnow()
                audit.record(s, f"study.{new}", study_uid=st.study_uid, patient_id=st.patient_id,
                             detail={"from": old, "to": new, "version": st.version,
                                     "instances": st.instance_count})
            done.append(st.study_uid)
    for uid in done:
        log.info("study %s complete after %gs quiet; queued", uid, quiet_seconds)
    return done


def frontal_chest_reason(ds) -> str | None:  # noqa: ANN001 - a pydicom Dataset
    """None when the header allows a frontal chest film, else why it is not analysed.
    BodyPartExamined must be CHEST (or absent) and ViewPosition PA or AP (or absent)."""
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body and body != "CHEST":
        return f"BodyPartExamined is {body}, not CHEST"
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view not in ("PA", "AP"):
        return f"ViewPosition is {view}: only frontal (PA/AP) films are analysed"
    return None
