"""Urgent notifications: durable and retried like the outbox.

When a study version is recorded (cxr_node.study.results), each ``[[notifications]]`` channel is
told if the study is flagged urgent and the channel was not told so already, and told again, as a
correction, when a later version changes the call (urgent -> not urgent, or not urgent -> urgent
after an earlier notification). Stations in shadow mode notify no one. The message (HL7 v2
ORU^R01 or a FHIR R4 Bundle) is written under the outbox directory (fsync + rename) before its
row exists, in the caller's transaction; ``drain`` sends what is due: the answer is read (ACK,
HTTP status), transient failures back off with jitter up to ``[outbox] max_attempts``, permanent
ones are dead letters at once; every step is audited (``notify.*``) without the message itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from typing import Sequence

from sqlalchemy import select, update

from cxr_node.audit import trail as audit
from cxr_node.config import Notification as Channel
from cxr_node.config import Settings
from cxr_node.config.channels import HL7V2
from cxr_node.db.models import Notification, utcnow
from cxr_node.dicom.status import PERMANENT, SENT, SendOutcome
from cxr_node.errors import ConfigError
from cxr_node.model import triggers as trigger_rules

log = logging.getLogger(__name__)

PENDING, DONE, DEAD = "pending", "sent", "dead"
NOTICE = "NOT FOR DIAGNOSTIC USE: research triage, not a diagnosis."


def percent(p: float) -> str:
    """At most 3 significant digits, never exponent notation; "< 0.1%" below that."""
    v = 100 * float(p)
    return "< 0.1%" if v < 0.1 else f"{v:.3g}%"


def info(w, model, when: dt.datetime) -> dict:
    """What a message says about study version ``w`` (cxr_node.study.work.StudyWork)."""
    from cxr_node.study.work import element

    ds = next((f.ds for f in w.analysed), None) or (w.films[0].ds if w.films else None)

    def get(kw: str) -> str:
        return str(element(ds, kw) or "").strip() if ds is not None else ""

    thresholds = trigger_rules.operating_points(model.thresholds, getattr(model, "abnormal_threshold", None))
    outputs = []
    for f in w.analysed:
        have = trigger_rules.outputs(f.prediction, thresholds)
        names = {n.lower(): n for n in list(f.prediction.labels) + ["abnormal"]}
        above = [(names.get(k, k), p, op) for k, (p, op) in have.items()
                 if p >= op and k not in ("normal", "no finding", "no_finding")]
        outputs.append({"sop_uid": f.instance.sop_instance_uid, "priority": f.prediction.priority, "above": above})
    call, prio = w.call, w.sent_priority
    best = max((a for o in outputs for a in o["above"]), key=lambda a: a[1] - a[2], default=None)
    what = (f"{best[0]} {percent(best[1])}, above the operating point {percent(best[2])}" if best
            else "no output above its operating point")
    head = {"urgent": "Urgent", "review": "Not urgent (review)", "routine": "Not urgent (routine)"}.get(call, "No call")
    summary = f"{head}: chest radiograph, AI triage {what}. {NOTICE}"
    if w.upstream is not None and prio != trigger_rules.node_priority(call):
        summary += f" Priority {trigger_rules.NAMES[prio]} kept from upstream ({w.upstream.source})."
    films = [f"Film {o['sop_uid']}: {o['priority']}; " + (", ".join(f"{n} {percent(p)} (operating point "
                                                                    f"{percent(op)})" for n, p, op in o["above"])
                                                         or "no output above its operating point")
             for o in outputs]
    return {"study_uid": w.study_uid, "version": w.version, "call": call, "priority": prio,
            "upstream": w.upstream.source if w.upstream is not None else None,
            "patient_id": get("PatientID"), "patient_name": get("PatientName"), "birth_date": get("PatientBirthDate"),
            "sex": get("PatientSex").upper()[:1], "accession": get("AccessionNumber"),
            "order_id": hashlib.sha1(w.study_uid.encode()).hexdigest()[:16].upper(),
            "time": when.strftime("%Y%m%d%H%M%S"), "iso_time": when.isoformat(timespec="seconds"),
            "summary": summary, "films": films, "outputs": outputs, "model": model.version}


def control_id(study_uid: str, version: int, channel: str) -> str:
    """MSH-10 (20 characters at most) and the Bundle's id: the same for a retry, new per version."""
    return "CXR" + hashlib.sha1(f"{study_uid}/{version}/{channel}".encode()).hexdigest()[:17].upper()


class Notifier:
    def __init__(self, db, outbox) -> None:
        self.db = db
        self.outbox = outbox  # its settings (replaced on reload), directory, durable writer, backoff, metrics

    @property
    def settings(self) -> Settings:
        return self.outbox.settings

    @property
    def metrics(self):
        return self.outbox.metrics

    # ----------------------------------------------------------------------------- queueing

    def decide(self, session, w, model) -> list[str]:
        """Queue this version's notifications (inside the caller's transaction); the channels told."""
        if not self.settings.notifications or w.call is None:
            return []
        now, told, data = utcnow(), [], None
        for ch in self.settings.notifications:
            last = session.scalars(select(Notification).where(
                Notification.study_uid == w.study_uid, Notification.channel == ch.name)
                .order_by(Notification.study_version.desc()).limit(1)).first()
            if last is not None and last.study_version >= w.version:
                continue  # this version (or a later one) was decided already
            was_urgent = last is not None and last.call == "urgent"
            if (w.call == "urgent") == was_urgent:
                continue  # the call did not change, or nothing to raise
            data = data or info(w, model, now)
            correction = last is not None
            cid = control_id(w.study_uid, w.version, ch.name)
            detail = {"channel": ch.name, "kind": ch.kind, "version": w.version, "call": w.call,
                      "priority": data["priority"], "correction": correction, "upstream": data["upstream"],
                      "control_id": cid}
            try:
                rel, state, error = self._write(ch, data, cid, correction), PENDING, None
            except Exception as e:  # a value the message format refuses: this channel's message only, not the study
                from cxr_node.logs import redact_quoted

                rel, state = "", DEAD
                error = redact_quoted(f"the message could not be built: {type(e).__name__}: {e}")[:500]
                log.error("notification of study %s to %s not built (%s)", w.study_uid, ch.name, type(e).__name__)
            session.add(Notification(channel=ch.name, kind=ch.kind, study_uid=w.study_uid, study_version=w.version,
                                     call=w.call, priority=data["priority"], correction=correction, control_id=cid,
                                     path=rel, state=state, attempts=0, next_attempt_at=now, created_at=now,
                                     last_error=error))
            if error:
                audit.record(session, "notify.dead", "failure", study_uid=w.study_uid, reason=error, detail=detail)
                continue
            audit.record(session, "notify.queued", study_uid=w.study_uid, patient_id=data["patient_id"] or None,
                         detail=detail)
            told.append(ch.name)
        return told

    def _write(self, ch: Channel, data: dict, cid: str, correction: bool) -> str:
        from cxr_node.outbox import fhir, hl7v2

        if ch.kind == HL7V2:
            body, ext = hl7v2.build(ch, data, cid, correction).encode("utf-8"), "hl7"
        else:
            body, ext = fhir.build(data, cid, correction).encode("utf-8"), "json"
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ch.name)[:40]
        rel = f"{data['study_uid']}/notify-{safe}-v{data['version']}.{ext}"
        tmp = self.outbox._files.write_temp(body, f"notify-{safe}")
        self.outbox._files.commit(tmp, rel)
        return rel

    # ----------------------------------------------------------------------------- sending

    def drain(self, limit: int = 100) -> int:
        with self.db.session() as s:
            due = list(s.scalars(select(Notification).where(Notification.state == PENDING,
                                                            Notification.next_attempt_at <= utcnow())
                                 .order_by(Notification.id).limit(limit)))
        sent = 0
        for row in due:
            if self._claim(row):
                sent += self._record(row, self._send(row))
        return sent

    def _claim(self, row: Notification) -> bool:
        """Take ``row`` for this node: its next attempt moves one lease ahead, in one conditional UPDATE, so
        nodes sharing the database never send one notification twice, and a node that dies mid-send leaves
        it due again once the lease has passed (no column of its own: the outbox items' ``claimed_by`` is
        what the node leases hand over; a notification needs only its due time)."""
        lease = dt.timedelta(seconds=float(self.settings.fleet.lease_seconds))
        with self.db.transaction() as s:
            got = s.execute(update(Notification)
                            .where(Notification.id == row.id, Notification.state == PENDING,
                                   Notification.next_attempt_at == row.next_attempt_at)
                            .values(next_attempt_at=utcnow() + lease)).rowcount
        return got == 1

    def _send(self, row: Notification) -> SendOutcome:
        from cxr_node.outbox import fhir, hl7v2

        try:
            ch = self.settings.notification(row.channel)
        except ConfigError:
            return SendOutcome(PERMANENT, None, f"channel {row.channel!r} is not in the running daemon's "
                               "[[notifications]] (add it, reload the daemon, then `cxr-node outbox retry`)")
        try:
            body = (self.outbox.dir / row.path).read_bytes()
        except OSError as e:
            return SendOutcome(PERMANENT, None, f"message file unreadable: {e.strerror}")
        return hl7v2.send(ch, body) if ch.kind == HL7V2 else fhir.send(ch, body)

    def _record(self, item: Notification, oc: SendOutcome) -> int:
        with self.db.transaction() as s:
            row = s.get(Notification, item.id, with_for_update=True)
            if row is None or row.state != PENDING:
                return 0
            row.attempts += 1
            row.last_status, row.last_error = oc.status, None if oc.kind == SENT else oc.reason
            detail = {"channel": row.channel, "kind": row.kind, "attempt": row.attempts, "version": row.study_version,
                      "call": row.call, "priority": row.priority, "correction": row.correction}
            if oc.kind != SENT and self.metrics:
                self.metrics.send_failures.labels(oc.kind).inc()
            if oc.kind == SENT:
                row.state, row.sent_at = DONE, utcnow()
                audit.record(s, "notify.sent", study_uid=row.study_uid, status=oc.status, reason=oc.reason,
                             detail=detail)
                log.info("notified %s (%s) of study %s v%d: %s%s", row.channel, row.kind, row.study_uid,
                         row.study_version, row.call, " (correction)" if row.correction else "")
                return 1
            if oc.kind == PERMANENT or row.attempts >= self.settings.outbox.max_attempts:
                why = oc.reason if oc.kind == PERMANENT else f"gave up after {row.attempts} attempts: {oc.reason}"
                row.state, row.last_error = DEAD, why
                audit.record(s, "notify.dead", "failure", study_uid=row.study_uid, status=oc.status, reason=why,
                             detail=detail)
                log.error("notification of study %s to %s dead-lettered (%s)", row.study_uid, row.channel,
                          why.split(" (")[0])
                return 0
            delay = self.outbox.backoff(row.attempts)
            row.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
            detail["retry_in_seconds"] = round(delay, 1)
            audit.record(s, "notify.retry", "failure", study_uid=row.study_uid, status=oc.status, reason=oc.reason,
                         detail=detail)
            log.warning("notification of study %s to %s failed; retry %d in %.0fs", row.study_uid, row.channel,
                        row.attempts + 1, delay)
        return 0

    # ----------------------------------------------------------------------------- admin

    def list(self, state: str | None = None) -> list[Notification]:
        with self.db.session() as s:
            q = select(Notification).order_by(Notification.id)
            if state:
                q = q.where(Notification.state == state)
            return list(s.scalars(q))

    def retry(self, ids: Sequence[int] = (), all_dead: bool = False, by: str | None = None) -> int:
        from cxr_node.outbox.requeue import requeue

        return requeue(self.db, Notification, "notify.requeued", lambda r: {"channel": r.channel, "id": r.id},
                       ids, all_dead, by)
