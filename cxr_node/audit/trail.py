"""Record and query audit events.

Event types are part of the interface (admins script against them); add, never rename.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_node.db.models import AuditChainHead, AuditEvent, utcnow

#: prev_hash of the first row.
GENESIS = "0" * 64
#: What a row's hash covers: every column but id, prev_hash and hash.
CHAIN_FIELDS = ("ts", "event", "outcome", "association_id", "calling_aet", "called_aet", "host", "port",
                "study_uid", "series_uid", "sop_instance_uid", "sop_class_uid", "patient_id", "transfer_syntax",
                "bytes", "status", "reason", "detail")


def _ts(value: Any) -> str:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers: its fields as sorted, compact JSON, the time in UTC."""
    d = {f: row.get(f) for f in CHAIN_FIELDS}
    d["ts"] = _ts(d["ts"])
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """SHA-256 over the previous row's hash and this row's canonical content."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(row)).hexdigest()

EVENTS: dict[str, str] = {
    "node.started": "the daemon started listening",
    "node.stopped": "the daemon stopped (SIGTERM/SIGINT)",
    "node.refused": "the daemon refused to start: its data_dir is provably not the one the other live nodes on "
                    "this database use (reason names the node and its marker file; docs/fleet.md)",
    "config.reloaded": "the daemon read its config file again (SIGHUP, `systemctl reload`; detail: changed, "
                       "kept_until_restart, running)",
    "config.reload_failed": "a reload was asked for but the config file does not validate; the daemon kept its "
                            "configuration (reason says why)",
    "connection.refused": "a TCP connection was closed before it associated: per-host limit, no A-ASSOCIATE-RQ "
                          "in time, not DICOM (one row per host and minute; detail counts the ones held back)",
    "association.opened": "an A-ASSOCIATE-RQ arrived",
    "association.accepted": "the association was accepted",
    "association.rejected": "the association was refused (reason says why)",
    "association.released": "the peer released the association",
    "association.aborted": "the association was aborted",
    "echo.received": "a C-ECHO was answered",
    "instance.stored": "an instance was made durable and recorded",
    "instance.duplicate": "an already stored SOP Instance UID arrived again (not stored twice)",
    "instance.failed": "an instance was refused (status and reason say why)",
    "instance.recovered": "a spooled file without a database row was registered at start-up",
    "instance.not_for_triage": "an instance was stored but will not be triaged (reason says why)",
    "spool.partial_removed": "a partial temp file from an interrupted write was removed at start-up",
    "study.receiving": "a new study started arriving",
    "study.reopened": "an instance arrived after completion; the study's version went up",
    "study.complete": "the study is complete (detail.rule: quiet = nothing arrived for quiet_seconds; release = "
                      "the association that delivered its films was released and nothing more arrived for "
                      "release_grace_seconds)",
    "study.queued": "the complete study was queued for processing",
    "study.processing": "a worker claimed the study",
    "study.processed": "the study's results are encoded and in the outbox (detail: priority, counts, model)",
    "study.failed": "processing failed (reason says why)",
    "study.requeued": "another node took over a study whose node's lease had expired (detail: node = the dead "
                      "node's id, by = the node taking over, attempt: the interrupted attempt counts toward "
                      "[study] max_attempts)",
    "study.reprocess": "an admin queued a finished study for analysis again (`cxr-node reprocess`); its version "
                       "went up, so the new SR names the previous one",
    "image.triaged": "an image was analysed (detail: probabilities, top class, urgent, model version)",
    "image.skipped": "an image was not analysed (reason says why: view, body part, pixels, SOP class)",
    "outbox.queued": "a result object was queued for a destination",
    "outbox.sent": "a result object was stored by the destination",
    "outbox.retry": "a send failed transiently; it will be retried (detail: retry_in_seconds)",
    "outbox.dead": "a send failed permanently or too often; the item is dead-lettered",
    "outbox.requeued": "an admin put an item back to pending, or a node took over an item whose node's lease had "
                       "expired (detail: node = the dead node's id, by, attempt)",
    "notify.queued": "an urgent notification (or a correction of one) was written and queued for a "
                     "[[notifications]] channel (detail: channel, version, call, priority, correction, upstream)",
    "notify.sent": "the channel acknowledged the notification (HL7 ACK AA, HTTP 2xx)",
    "notify.retry": "a notification failed transiently (no answer, ACK AE, HTTP 5xx); retried with backoff",
    "notify.dead": "a notification gave up: rejected (ACK AR, HTTP 4xx) or max_attempts reached",
    "notify.requeued": "an admin put a notification back to pending",
    "outbox.purged": "an admin removed a sent or dead item",
    "outbox.resend": "an admin queued a study's kept results again (`cxr-node resend`; detail: destinations, counts)",
    "retention.removed": "the retention job deleted an old film or sent result file (detail: kind, path)",
    "web.login": "a user logged in to the web console (host: their address; detail: user, role)",
    "web.login_failed": "a web console login was refused (reason: unknown user, wrong password, disabled, "
                        "or throttled after repeated failures; detail: user as typed)",
    "web.logout": "a user logged out of the web console, or their session expired",
    "web.study_viewed": "a user opened a study in the web console (who saw which patient's study)",
    "web.audit_viewed": "a user read or exported the audit trail in the web console (detail: filters, format)",
    "web.worklist_searched": "a user searched the web console's worklist by patient ID",
    "user.added": "a web console user was created (`cxr-node user add`; detail: user, role)",
    "user.password_changed": "a web console user's password was set (`cxr-node user passwd`)",
    "user.disabled": "a web console user was disabled (`cxr-node user disable`); their sessions ended",
    "station.added": "films came from a station for the first time (detail: station, mode)",
    "station.mode": "a station's mode changed, e.g. shadow -> active (detail: station, from, to)",
    "station.baseline": "a station without a site calibration got its drift baseline: its first films",
    "station.drift": "a station's films or the model's answers on them moved past [onboarding] drift_threshold "
                     "(reason and detail: what moved, PSI per statistic)",
    "station.drift_cleared": "a station that had drifted is back within the threshold",
    "study.shadow": "a study from a station in shadow mode was analysed; its results are kept, not sent",
    "feedback.added": "a reader's label for a study (or film) was stored (detail: label, reader, source, supersedes)",
    "feedback.import": "a feedback CSV was imported (detail: file, counts)",
    "calibration.site": "a site calibration was stored and made active (detail: station, version, figures)",
    "calibration.rollback": "a station's site calibration was rolled back to the previous one (or to the model's)",
    "adaptation.site": "a station's site heads were stored and made active (detail: station, version, classes, "
                       "thresholds, AUC before/after with the paired interval)",
    "adaptation.rollback": "a station's site heads were rolled back to the previous version (or to the model's head)",
}

#: The stable field names of ``cxr-node audit --format json|csv``.
FIELDS: tuple[str, ...] = (
    "id", "time", "event", "outcome", "association_id", "calling_aet", "called_aet", "host", "port",
    "study_uid", "series_uid", "sop_instance_uid", "sop_class_uid", "patient_id", "transfer_syntax",
    "bytes", "status", "reason", "detail",
)


def record(session: Session, event: str, outcome: str = "success", *, ts: dt.datetime | None = None,
           **fields: Any) -> AuditEvent:
    """Add one audit row to the session's transaction (the caller commits)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event type {event!r}")
    head = session.get(AuditChainHead, 1, with_for_update=True)  # serialises writers of the chain
    if head is None:
        head = AuditChainHead(id=1, last_id=None, last_hash=GENESIS)
        session.add(head)
    row = AuditEvent(event=event, outcome=outcome, ts=ts or utcnow(), **fields)
    row.prev_hash = head.last_hash
    row.hash = chain_hash(head.last_hash, {f: getattr(row, f) for f in CHAIN_FIELDS})
    session.add(row)
    session.flush()  # ids in chain order
    head.last_id, head.last_hash = row.id, row.hash
    return row


@dataclass(frozen=True)
class ChainReport:
    rows: int
    first_bad_id: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(session: Session) -> ChainReport:
    """Walk the trail in id order; the first row whose hash or link does not hold is reported.
    Catches rows changed, removed (a broken link) or inserted outside the program."""
    prev, n, last_id = GENESIS, 0, None
    for row in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
        n += 1
        if row.prev_hash != prev:
            what = "removed or reordered before it" if row.prev_hash else "inserted outside cxr-node (no hash)"
            return ChainReport(n, row.id, f"row {row.id} ({row.event}): link broken: a row was {what}")
        if row.hash != chain_hash(prev, {f: getattr(row, f) for f in CHAIN_FIELDS}):
            return ChainReport(n, row.id, f"row {row.id} ({row.event}): content does not match its hash (changed)")
        prev, last_id = row.hash, row.id
    head = session.get(AuditChainHead, 1)
    if head is not None and (head.last_id, head.last_hash) != (last_id, prev):
        return ChainReport(n, last_id, f"the newest row(s) after id {last_id} were removed "
                                       f"(chain head says id {head.last_id})")
    return ChainReport(n)


@dataclass(frozen=True)
class AuditQuery:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    study_uid: str | None = None
    events: Sequence[str] = ()
    calling_aet: str | None = None
    patient_id: str | None = None
    outcome: str | None = None
    limit: int | None = None
    offset: int = 0
    newest_first: bool = False


def query(session: Session, q: AuditQuery) -> list[AuditEvent]:
    return list(session.scalars(_filtered(select(AuditEvent), q)))


def count(session: Session, q: AuditQuery) -> int:
    """How many rows the query's filters match (its limit and offset aside)."""
    from sqlalchemy import func

    return session.scalar(_filtered(select(func.count()).select_from(AuditEvent), q, order=False))


def _filtered(stmt, q: AuditQuery, order: bool = True):
    if q.since:
        stmt = stmt.where(AuditEvent.ts >= q.since)
    if q.until:
        stmt = stmt.where(AuditEvent.ts < q.until)
    if q.study_uid:
        stmt = stmt.where(AuditEvent.study_uid == q.study_uid)
    if q.events:
        stmt = stmt.where(AuditEvent.event.in_(list(q.events)))
    if q.calling_aet:
        stmt = stmt.where(AuditEvent.calling_aet == q.calling_aet)
    if q.patient_id:
        stmt = stmt.where(AuditEvent.patient_id == q.patient_id)
    if q.outcome:
        stmt = stmt.where(AuditEvent.outcome == q.outcome)
    if not order:
        return stmt
    stmt = stmt.order_by(AuditEvent.id.desc() if q.newest_first else AuditEvent.id)
    if q.offset:
        stmt = stmt.offset(q.offset)
    if q.limit:
        stmt = stmt.limit(q.limit)
    return stmt


def as_dict(row: AuditEvent) -> dict[str, Any]:
    d = {f: getattr(row, f) for f in FIELDS if f not in ("time",)}
    d["time"] = row.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {f: d[f] for f in FIELDS}


def as_dicts(rows: Iterable[AuditEvent]) -> list[dict[str, Any]]:
    return [as_dict(r) for r in rows]


_ASSOCIATION_EVENTS = ("association.opened", "association.accepted", "association.released", "association.aborted")


def study_story(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """Everything about one study in order, including the associations that brought it."""
    own = as_dicts(query(session, AuditQuery(study_uid=study_uid)))
    assoc_ids = {r["association_id"] for r in own if r["association_id"]}
    assoc: list[dict[str, Any]] = []
    if assoc_ids:
        stmt = (select(AuditEvent).where(AuditEvent.event.in_(_ASSOCIATION_EVENTS),
                                         AuditEvent.association_id.in_(sorted(assoc_ids))).order_by(AuditEvent.id))
        assoc = as_dicts(session.scalars(stmt))
    return sorted(own + assoc, key=lambda r: r["id"])


def _user(r: dict[str, Any]) -> str:
    return str((r.get("detail") or {}).get("user", "?"))


_STORY = {
    "association.opened": lambda r: f"association from {r['calling_aet']}@{r['host']}:{r['port']}",
    "instance.stored": lambda r: f"stored {r['sop_instance_uid']} ({r['bytes']} bytes, {r['transfer_syntax']})",
    "instance.duplicate": lambda r: f"duplicate {r['sop_instance_uid']}",
    "image.triaged": lambda r: (f"triaged {r['sop_instance_uid']}: {r['detail']['top_label']} "
                                f"{max(r['detail']['probabilities'].values()):.3f}, {r['detail']['priority']}"
                                f"{' URGENT' if r['detail']['urgent'] else ''} (model {r['detail']['model_version']})"),
    "image.skipped": lambda r: f"not analysed {r['sop_instance_uid']}: {r['reason']}",
    "outbox.sent": lambda r: f"sent {r['sop_instance_uid']} to {r['detail']['destination']}: {r['reason']}",
    "outbox.retry": lambda r: f"send of {r['sop_instance_uid']} to {r['detail']['destination']} failed: {r['reason']}",
    "outbox.dead": lambda r: f"gave up sending {r['sop_instance_uid']} to {r['detail']['destination']}: {r['reason']}",
    "outbox.resend": lambda r: (f"resend to {', '.join(r['detail']['destinations'])}: {r['detail']['queued']} queued, "
                                f"{r['detail']['requeued']} sent again, {r['detail']['already_pending']} already waiting"),
    "study.reprocess": lambda r: f"queued for analysis again as version {r['detail']['version']} (was {r['detail']['from']})",
    "feedback.added": lambda r: (f"labelled {r['detail']['label']}"
                                 + (f" (film {r['sop_instance_uid']})" if r['sop_instance_uid'] else "")
                                 + (f" by {r['detail']['reader']}" if r['detail'].get('reader') else "")
                                 + f" at {r['detail']['labelled_at']} ({r['detail']['source']})"
                                 + (f"; supersedes {r['detail']['previous_label']}" if r['detail'].get('supersedes')
                                    else "")),
    "web.study_viewed": lambda r: f"viewed in the web console by {_user(r)} from {r['host']}",
}


def describe(row: dict[str, Any]) -> str:
    """One line saying what an audit row (as from :func:`as_dict`) means, for a study's story."""
    text = _STORY.get(row["event"])
    if text:
        return text(row)
    return row["reason"] or (json.dumps(row["detail"]) if row["detail"] else "")
