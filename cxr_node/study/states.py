"""The study state machine: every state, every transition, and who makes it, in one module.

    receiving --(quiet for quiet_seconds)--> complete --> queued --(claimed by a worker)--> processing
    receiving --(its association released, nothing more for release_grace_seconds)--> complete
    processing --> processed | failed            (the pipeline, cxr_node.study.pipeline)
    processing --> queued                        (start-up: processing was interrupted; or the node
                                                  stopped in order while holding it unfinished)
    failed --(retry_at reached, attempts left)--> queued   (retry_failed: bounded, with backoff)
    any state but receiving --(an instance arrives)--> receiving, version + 1   (study.reopened)
    processed | failed --(cxr-node reprocess)--> queued, version + 1

The database is the only state: after a restart every study resumes from its persisted state
and its persisted ``last_received_at``. Every transition is audited as ``study.<new state>``
(``study.reopened`` for a reopening) with ``detail.from``/``to``/``version``. Retention removes
only studies in a :data:`FINISHED` state.

Each claim of a version counts as an attempt (``Study.attempts``). A failed version is queued
again after ``retry_seconds`` (doubling each time) until ``max_attempts`` claims have failed; a
version that was interrupted (the daemon died while analysing it) as often is failed at start-up
rather than queued again, so one film that crashes the process cannot stall the queue for ever.
A new version (a late instance, ``cxr-node reprocess``) starts with no attempts.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxr_node.audit import trail as audit
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


def move(session: Session, study: Study, new: str, *, reason: str | None = None, **detail) -> None:
    """Change ``study``'s state (an allowed transition) and audit it, in the caller's transaction."""
    old = study.state
    if new not in TRANSITIONS.get(old, ()):
        raise ValueError(f"study {study.study_uid}: {old} -> {new} is not a transition of the study state machine")
    study.state, study.state_changed_at = new, utcnow()
    audit.record(session, f"study.{new}", "failure" if new == FAILED else "success", study_uid=study.study_uid, patient_id=study.patient_id, reason=reason,
                 detail={"from": old, "to": new, "version": study.version, **detail})


def note_instance(session: Session, study_uid: str, patient_id: str | None, now: dt.datetime,
                  association_id: str | None = None, rank: int | None = None) -> int:
    """Record that an instance of ``study_uid`` arrived; returns the study version it joins.
    ``rank``: the sender's urgency (:func:`cxr_node.study.scheduling.dimse_rank`); the version keeps
    the most urgent of its instances'.

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
        study.attempts, study.retry_at = 0, None
        audit.record(session, "study.reopened", ts=now, study_uid=study_uid, patient_id=study.patient_id,
                     association_id=association_id,
                     reason=f"instance arrived while the study was {previous}",
                     detail={"from": previous, "to": RECEIVING, "version": study.version})
        log.info("study %s reopened as version %d (was %s)", study_uid, study.version, previous)
        study.upstream_rank = None
    if rank is not None:
        study.upstream_rank = rank if study.upstream_rank is None else min(study.upstream_rank, rank)
    study.instance_count += 1
    study.last_received_at = now
    return study.version


#: ``detail.rule`` of ``study.complete``: which rule completed the study.
RULE_QUIET = "quiet"
RULE_RELEASE = "release"


def complete_quiet_studies(db: Database, quiet_seconds: float) -> list[str]:
    """Move every study quiet for ``quiet_seconds`` to complete, then queued. Returns their UIDs."""
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    done = []
    with db.transaction() as s:
        studies = s.scalars(
            select(Study).where(Study.state == RECEIVING, Study.last_received_at <= cutoff).with_for_update()
        ).all()
        for st in studies:
            move(s, st, COMPLETE, reason=f"nothing arrived for {quiet_seconds:g} s ([study] quiet_seconds)",
                 instances=st.instance_count, rule=RULE_QUIET, quiet_seconds=quiet_seconds)
            move(s, st, QUEUED, instances=st.instance_count)
            done.append(st.study_uid)
    for uid in done:
        log.info("study %s complete after %gs quiet; queued", uid, quiet_seconds)
    return done


def complete_released(db: Database, association_id: str, released_at: dt.datetime, grace_seconds: float,
                      now: dt.datetime | None = None) -> list[str]:
    """The release rule: the studies that association ``association_id`` (released at
    ``released_at``) delivered films to move to complete, then queued, if for each

    * it is still receiving and nothing arrived since the release (``last_received_at``), and
      ``grace_seconds`` have passed since it;
    * every film of its current version came through this association: a study whose films
      arrive over several associations waits for its quiet period, as does one whose sender
      keeps its association open or aborts it (no release, so this is never called).

    A film arriving later reopens the study as a new version, as after the quiet period.
    Returns the UIDs completed."""
    now = now or utcnow()
    if now < released_at + dt.timedelta(seconds=grace_seconds):
        return []
    done = []
    with db.transaction() as s:
        uids = list(s.scalars(select(Instance.study_uid).where(Instance.association_id == association_id)
                              .distinct()))
        for uid in uids:
            st = s.get(Study, uid, with_for_update=True)
            if st is None or st.state != RECEIVING or _aware(st.last_received_at) > released_at:
                continue
            others = s.scalar(select(func.count()).select_from(Instance).where(
                Instance.study_uid == uid, Instance.study_version == st.version,
                (Instance.association_id != association_id) | Instance.association_id.is_(None)))
            if others:
                log.debug("study %s: films from several associations; the quiet period completes it", uid)
                continue
            move(s, st, COMPLETE, reason=f"the association that delivered it was released and nothing more "
                 f"arrived for {grace_seconds:g} s ([study] release_grace_seconds)",
                 instances=st.instance_count, rule=RULE_RELEASE, association_id=association_id,
                 grace_seconds=grace_seconds)
            move(s, st, QUEUED, instances=st.instance_count)
            done.append(uid)
    for uid in done:
        log.info("study %s complete: association %s released, nothing more for %gs; queued", uid,
                 association_id, grace_seconds)
    return done


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes (stored as UTC)."""
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def claim(db: Database, limit: int, node_id: str, order: tuple | None = None) -> list[tuple[str, int]]:
    """Atomically move up to ``limit`` queued studies to processing, for ``node_id``; ``order`` is
    the ORDER BY (the worker's: :func:`cxr_node.study.scheduling.claim_order`), else first queued
    first."""
    out = []
    with db.transaction() as s:
        q = select(Study).where(Study.state == QUEUED).order_by(*(order or (Study.state_changed_at,))).limit(limit)
        if db.engine.dialect.name != "sqlite":
            q = q.with_for_update(skip_locked=True)
        for st in s.scalars(q):
            st.claimed_by = node_id
            st.attempts = (st.attempts or 0) + 1
            move(s, st, PROCESSING, node=node_id, attempt=st.attempts)
            out.append((st.study_uid, st.version))
    return out


def any_queued(db: Database) -> bool:
    """Whether any study waits in the queue (the worker ends its round early for it)."""
    with db.session() as s:
        return s.scalar(select(Study.study_uid).where(Study.state == QUEUED).limit(1)) is not None


def requeue_interrupted(db: Database, node_id: str, max_attempts: int = 3) -> int:
    """At start-up: studies a crash left in processing (claimed by this node) go back to queued,
    unless they have been interrupted ``max_attempts`` times (then they fail: something in them
    takes the process down). Returns how many were queued again."""
    n = 0
    with db.transaction() as s:
        for st in s.scalars(select(Study).where(Study.state == PROCESSING, Study.claimed_by == node_id)
                            .with_for_update()):
            if (st.attempts or 0) >= max_attempts:
                reason = (f"processing was interrupted {st.attempts} time(s) (the daemon stopped while analysing "
                          "it); not retried again: `cxr-node reprocess` queues it once the cause is fixed")
                st.last_error, st.retry_at = reason, None
                move(s, st, FAILED, reason=reason, attempt=st.attempts, final=True)
                continue
            move(s, st, QUEUED, reason="processing was interrupted; queued again at start-up", attempt=st.attempts)
            n += 1
    return n


def release(db: Database, keys: list[tuple[str, int]], why: str) -> int:
    """processing -> queued for the ``(uid, version)`` pairs a node held unfinished when it stopped
    in order (the claim does not count as an attempt). Returns how many were queued again."""
    n = 0
    with db.transaction() as s:
        for uid, version in keys:
            st = s.get(Study, uid, with_for_update=True)
            if st is None or st.state != PROCESSING or st.version != version:
                continue
            st.attempts = max(0, (st.attempts or 0) - 1)
            move(s, st, QUEUED, reason=why, attempt=st.attempts)
            n += 1
    if n:
        log.info("%d unfinished stud(ies) queued again: %s", n, why)
    return n


def backoff_seconds(attempt: int, retry_seconds: float) -> float:
    """The wait before claim number ``attempt + 1``: ``retry_seconds`` doubled per failed attempt,
    at most one day."""
    return min(86400.0, retry_seconds * 2 ** max(0, attempt - 1))


def finish(session: Session, study: Study, version: int, **detail) -> bool:
    """processing -> processed for ``version``; False (nothing changed) if the study moved on meanwhile
    (reopened by a late instance: that version will be processed in its turn)."""
    if study.state != PROCESSING or study.version != version:
        return False
    move(session, study, PROCESSED, **detail)
    return True


def fail(db: Database, study_uid: str, version: int, reason: str, *, max_attempts: int = 1,
         retry_seconds: float = 60, retry: bool = True, node_id: str | None = None) -> dt.datetime | None:
    """processing -> failed for ``version``, audited with ``reason``. While the version has been
    claimed fewer than ``max_attempts`` times (and ``retry``), it is queued again after the backoff
    (:func:`retry_failed`); returns when, or None when this failure is final. With ``node_id``, only
    while that node still holds the claim (another may have taken it over: cxr_node.study.leases)."""
    retry_at = None
    with db.transaction() as s:
        st = s.get(Study, study_uid, with_for_update=True)
        if (st is not None and st.state == PROCESSING and st.version == version
                and (node_id is None or st.claimed_by == node_id)):
            attempt = st.attempts or 0
            if retry and attempt < max_attempts:
                retry_at = utcnow() + dt.timedelta(seconds=backoff_seconds(attempt, retry_seconds))
            st.last_error, st.retry_at = reason, retry_at
            move(s, st, FAILED, reason=reason, attempt=attempt, max_attempts=max_attempts,
                 retry_at=retry_at.isoformat(timespec="seconds") if retry_at else None, final=retry_at is None)
        else:
            audit.record(s, "study.failed", "failure", study_uid=study_uid, reason=reason, detail={"version": version})
    if retry_at is not None:
        log.error("study %s v%d failed: %s (retried at %s)", study_uid, version, reason,
                  retry_at.isoformat(timespec="seconds"))
    else:
        log.error("study %s v%d failed: %s", study_uid, version, reason)
    return retry_at


def retry_failed(db: Database, now: dt.datetime | None = None) -> list[str]:
    """failed -> queued for every study whose ``retry_at`` has come (set by :func:`fail` while
    attempts were left). Returns their UIDs."""
    now = now or utcnow()
    done = []
    with db.transaction() as s:
        for st in s.scalars(select(Study).where(Study.state == FAILED, Study.retry_at.is_not(None),
                                                Study.retry_at <= now).with_for_update()):
            st.retry_at = None
            move(s, st, QUEUED, reason=f"retry after a failed attempt ({st.attempts} so far): {st.last_error}"[:500],
                 attempt=st.attempts)
            done.append(st.study_uid)
    for uid in done:
        log.info("study %s queued again after a failed attempt", uid)
    return done


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
        st.attempts, st.retry_at = 0, None
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


def still_processing(db: Database, claimed: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The ``(uid, version)`` pairs of ``claimed`` that are still processing at that version."""
    if not claimed:
        return []
    with db.session() as s:
        rows = s.execute(select(Study.study_uid, Study.version).where(
            Study.study_uid.in_([uid for uid, _ in claimed]), Study.state == PROCESSING)).all()
    live = {(uid, version) for uid, version in rows}
    return [c for c in claimed if tuple(c) in live]
