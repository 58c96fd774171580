"""Analyse a finished study again (``cxr-node reprocess``), e.g. after a model upgrade.

It uses the state machine's own reopen step (``assembly.note_instance``): the study's version
goes up and it goes back to ``queued``, here without waiting for a quiet period since nothing new
arrives. The worker then analyses it as any queued study, and because the version changed the new
SR gets a new UID and names the previous SR as its predecessor (``Processor._predecessor``).
Secondary Captures keep their UIDs (they derive from the film and the model), so a PACS that has
them does not get them twice.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import func, select

from cxr_node import assembly, audit
from cxr_node.db.models import Instance, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import CxrNodeError

log = logging.getLogger(__name__)

#: States from which a study may be analysed again; in the others it is on its way already.
FINISHED = ("processed", "failed")


def requeue(db: Database, study_uid: str) -> int:
    """Queue ``study_uid`` for analysis as a new version; returns that version. Audited as
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
        st.state, st.state_changed_at, st.claimed_by = assembly.QUEUED, now, None
        audit.record(s, "study.reprocess", ts=now, study_uid=study_uid, patient_id=st.patient_id,
                     reason="requested by an admin (cxr-node reprocess)",
                     detail={"from": previous, "to": assembly.QUEUED, "version": st.version, "films": films})
        version = st.version
    log.info("study %s queued for analysis again as version %d", study_uid, version)
    return version


def finished_since(db: Database, since: dt.datetime) -> list[str]:
    """Processed or failed studies that received an instance at or after ``since``, oldest first."""
    with db.session() as s:
        return list(s.scalars(select(Study.study_uid).where(Study.state.in_(FINISHED),
                                                            Study.last_received_at >= since)
                              .order_by(Study.last_received_at)))
