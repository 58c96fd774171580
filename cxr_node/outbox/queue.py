"""The durable outbox: result objects are written to disk and recorded before any send is tried.

An APScheduler job (``drain``) sends what is due to each destination with C-STORE. Transient
failures (peer down, timeout, transient rejection, 0xA7xx) are retried with exponential backoff
and jitter; permanent ones (permanent rejection, 0xA9xx, 0xCxxx) are dead-lettered at once; after
``max_attempts`` an item is dead-lettered too. Nothing loops forever and every attempt is audited.
Object UIDs are deterministic, so an object queued twice (a retry after a crash) is one row per
destination and the PACS never gets a second copy.

Result files are written whether or not any destination is configured, and kept (retention only
removes files whose every row is sent), so ``resend`` can queue a study's results later: for a
destination added since, or again for one that lost them.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pydicom.dataset import Dataset
from sqlalchemy import case, func, select

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import ImageResult, OutboxItem, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.dicom.status import PERMANENT, SENT, SendOutcome
from cxr_node.dicom.uids import IMPLEMENTATION_CLASS_UID, implementation_version_name
from cxr_node.errors import ConfigError, CxrNodeError
from cxr_node.outbox import channels
from cxr_node.outbox.files import result_path
from cxr_node.outbox.send import FileToSend
from cxr_node.receive.spool import Spool
from cxr_node.study.scheduling import MEDIUM

log = logging.getLogger(__name__)

PENDING, DONE, DEAD = "pending", "sent", "dead"


@dataclass(frozen=True)
class WrittenObject:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    kind: str
    path: str  # relative to the outbox directory


class Outbox:
    def __init__(self, settings: Settings, db: Database, incoming_dir: Path | None = None) -> None:
        self.settings = settings
        self.db = db
        self.dir = settings.storage.outbox_dir
        self._files = Spool(self.dir, incoming_dir or settings.storage.incoming_dir / "outbox")
        self.metrics = None  # set by the service when [metrics] port is on
        from cxr_node.outbox.notify import Notifier

        self.notifier = Notifier(db, self)  # urgent notifications: same directory, rules and drain
        self.node_id = "local"  # the service's node id: items being sent carry it (cxr_node.study.leases)

    def prepare(self) -> list[Path]:
        """Create the directories and remove temp files of writes a crash interrupted."""
        return self._files.prepare()

    def write(self, ds: Dataset, kind: str) -> WrittenObject:
        """Encode ``ds`` as a Part 10 file and make it durable under the outbox directory."""
        buf = io.BytesIO()
        if getattr(ds, "file_meta", None) is not None:
            # PS3.10 7.1: the implementation that wrote the file (us, not highdicom or pydicom)
            ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            ds.file_meta.ImplementationVersionName = implementation_version_name()
        ds.save_as(buf, enforce_file_format=True)
        rel = result_path(ds.StudyInstanceUID, ds.SOPInstanceUID)
        tmp = self._files.write_temp(buf.getvalue(), ds.SOPInstanceUID)
        self._files.commit(tmp, rel)
        return WrittenObject(ds.SOPInstanceUID, ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID), kind, str(rel))

    def enqueue(self, session, objects: Iterable[WrittenObject], study_uid: str, study_version: int) -> int:
        """One pending row per object and destination (inside the caller's transaction)."""
        now, n = utcnow(), 0
        for obj in objects:
            for dest in self.settings.destinations:
                exists = session.scalar(select(OutboxItem.id).where(
                    OutboxItem.sop_instance_uid == obj.sop_instance_uid, OutboxItem.destination == dest.name))
                if exists:
                    continue  # same object (deterministic UID) already queued: never a second copy
                self._add(session, obj, dest.name, study_uid, study_version, now)
                n += 1
        return n

    def _add(self, session, obj: WrittenObject, destination: str, study_uid: str, study_version: int,
             now: dt.datetime, **detail) -> None:
        session.add(OutboxItem(destination=destination, sop_instance_uid=obj.sop_instance_uid,
                               sop_class_uid=obj.sop_class_uid, transfer_syntax=obj.transfer_syntax,
                               study_uid=study_uid, study_version=study_version, kind=obj.kind,
                               path=obj.path, state=PENDING, attempts=0, next_attempt_at=now, created_at=now))
        audit.record(session, "outbox.queued", study_uid=study_uid, sop_instance_uid=obj.sop_instance_uid,
                     sop_class_uid=obj.sop_class_uid, detail={"destination": destination, "kind": obj.kind, **detail})

    # ----------------------------------------------------------------------------- resend

    def results_of(self, session, study_uid: str) -> tuple[Study, list[WrittenObject], list[str]]:
        """A study's current results as kept on disk: the Secondary Captures of its last processed
        version and its last SR. Returns the study, the objects, and the UIDs whose file is gone."""
        from pydicom import dcmread

        st = session.get(Study, study_uid)
        if st is None:
            raise CxrNodeError(f"study {study_uid}: not known to this node (check the UID, and --config)")
        if st.processed_version is None and st.last_sr_uid is None:
            raise CxrNodeError(f"study {study_uid}: no results yet (it is {st.state}); they are sent when "
                               "it has been analysed")
        uids = list(session.scalars(select(ImageResult.sc_sop_instance_uid).where(
            ImageResult.study_uid == study_uid, ImageResult.study_version == st.processed_version,
            ImageResult.sc_sop_instance_uid.is_not(None)).order_by(ImageResult.id)))
        if st.last_sr_uid:
            uids.append(st.last_sr_uid)
        if not uids:
            raise CxrNodeError(f"study {study_uid}: no results to send: none of its images was analysed "
                               f"(`cxr-node audit study {study_uid}` says why)")
        objects, missing = [], []
        for uid in dict.fromkeys(uids):
            rel = result_path(study_uid, uid)
            try:
                ds = dcmread(self.dir / rel, stop_before_pixels=True)
            except FileNotFoundError:
                missing.append(uid)
                continue
            objects.append(WrittenObject(uid, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID),
                                         "sr" if uid == st.last_sr_uid else "sc", str(rel)))
        if not objects:
            raise CxrNodeError(f"study {study_uid}: its result files are gone from {self.dir} (retention removes "
                               f"sent ones): `cxr-node reprocess {study_uid}` makes new ones")
        return st, objects, missing

    def resend(self, study_uid: str, destinations: Sequence[str]) -> dict:
        """Queue a study's kept results for ``destinations``: a new pending row where there is none, a
        sent or dead row put back to pending; already pending ones are left as they are. Audited as
        ``outbox.resend`` (one row with the counts) plus ``outbox.queued``/``outbox.requeued`` per item."""
        for name in destinations:
            self.settings.destination(name)  # ConfigError naming the known ones
        now = utcnow()
        report = {"queued": 0, "requeued": 0, "already_pending": 0}
        with self.db.transaction() as s:
            st, objects, missing = self.results_of(s, study_uid)
            for obj in objects:
                for name in destinations:
                    row = s.scalar(select(OutboxItem).where(OutboxItem.sop_instance_uid == obj.sop_instance_uid,
                                                            OutboxItem.destination == name).with_for_update())
                    if row is None:
                        self._add(s, obj, name, study_uid, st.processed_version or st.version, now, resend=True)
                        report["queued"] += 1
                    elif row.state == PENDING:
                        report["already_pending"] += 1
                    else:
                        previous = row.state
                        row.state, row.attempts, row.next_attempt_at = PENDING, 0, now
                        row.last_error, row.removed_at = None, None  # the file is there again
                        audit.record(s, "outbox.requeued", study_uid=study_uid, sop_instance_uid=row.sop_instance_uid,
                                     sop_class_uid=row.sop_class_uid,
                                     detail={"destination": name, "id": row.id, "from": previous, "resend": True})
                        report["requeued"] += 1
            report.update(study_uid=study_uid, destinations=list(destinations), objects=len(objects),
                          missing=missing)
            audit.record(s, "outbox.resend", study_uid=study_uid, patient_id=st.patient_id,
                         reason=(f"{len(missing)} result file(s) no longer on disk" if missing else None),
                         detail={k: v for k, v in report.items() if k != "study_uid"})
        return report

    # ----------------------------------------------------------------------------- sending

    def backoff(self, attempts: int) -> float:
        o = self.settings.outbox
        return min(o.retry_max_seconds, o.retry_base_seconds * 2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)

    def drain(self, limit: int = 200) -> int:
        """Send every due notification, then every due item, once; returns how many were sent."""
        sent = self.notifier.drain() if self.settings.notifications or self._notifications_pending() else 0
        return sent + self._drain_items(limit)

    def _notifications_pending(self) -> bool:
        from cxr_node.db.models import Notification

        with self.db.session() as s:
            return s.scalar(select(Notification.id).where(Notification.state == PENDING).limit(1)) is not None

    def _drain_items(self, limit: int) -> int:
        """Send every due item once; returns how many were sent. Each item is claimed for this node
        first (``claimed_by``, under its lease), so nodes sharing the database never send one twice."""
        ids = self._due_ids(limit)
        rank = {item_id: k for k, item_id in enumerate(ids)}
        due = sorted(self._claim(ids), key=lambda r: rank[r.id]) if ids else []
        by_dest: dict[str, list[OutboxItem]] = {}
        for item in due:
            by_dest.setdefault(item.destination, []).append(item)
        sent = 0
        for name, items in by_dest.items():
            try:
                dest = self.settings.destination(name)
            except ConfigError:
                outcomes = [SendOutcome(PERMANENT, None, f"destination {name!r} is not in the running daemon's [[destinations]] (after adding it "
                                        "to the config, reload the daemon, then `cxr-node outbox retry`)")] * len(items)
            else:
                files = [FileToSend(self.dir / i.path, i.sop_class_uid, i.transfer_syntax, i.sop_instance_uid)
                         for i in items]
                outcomes = channels.send(self.settings, dest, files)
            sent += self._record(items, outcomes)
        return sent

    def _due_ids(self, limit: int) -> list[int]:
        """The due, unclaimed items, most urgent first: a study version the node called urgent (any of
        its films), then the sender's DIMSE Priority, then the order they were queued. So a PACS back
        from an outage, or a backlog longer than one drain, gets the urgent results first."""
        urgent = (select(ImageResult.id).where(ImageResult.study_uid == OutboxItem.study_uid,
                                               ImageResult.study_version == OutboxItem.study_version,
                                               ImageResult.urgent.is_(True)).exists())
        with self.db.session() as s:
            return list(s.scalars(
                select(OutboxItem.id).outerjoin(Study, Study.study_uid == OutboxItem.study_uid)
                .where(OutboxItem.state == PENDING, OutboxItem.next_attempt_at <= utcnow(),
                       OutboxItem.claimed_by.is_(None))
                .order_by(case((urgent, 0), else_=1), func.coalesce(Study.upstream_rank, MEDIUM), OutboxItem.id)
                .limit(limit)))

    def _claim(self, ids: list[int]) -> list[OutboxItem]:
        """The items of ``ids`` still pending and unclaimed, now claimed by this node."""
        with self.db.transaction() as s:
            q = select(OutboxItem).where(OutboxItem.id.in_(ids), OutboxItem.state == PENDING,
                                         OutboxItem.claimed_by.is_(None)).order_by(OutboxItem.id)
            if self.db.engine.dialect.name != "sqlite":
                q = q.with_for_update(skip_locked=True)
            rows = list(s.scalars(q))
            for row in rows:
                row.claimed_by = self.node_id
        return rows

    def _record(self, items: Sequence[OutboxItem], outcomes: Sequence[SendOutcome]) -> int:
        max_attempts = self.settings.outbox.max_attempts
        sent = 0
        with self.db.transaction() as s:
            for item, oc in zip(items, outcomes):
                row = s.get(OutboxItem, item.id, with_for_update=True)
                if row is None or row.state != PENDING:
                    continue  # purged or retried meanwhile
                if row.claimed_by not in (None, self.node_id):
                    log.warning("outbox item %d: taken over by %s while this node sent it (its lease lapsed); "
                                "that node's send counts", row.id, row.claimed_by)
                    continue
                row.claimed_by = None
                row.attempts += 1
                row.last_status, row.last_error = oc.status, None if oc.kind == SENT else oc.reason
                fields = dict(study_uid=row.study_uid, sop_instance_uid=row.sop_instance_uid,
                              sop_class_uid=row.sop_class_uid, status=oc.status)
                detail = {"destination": row.destination, "attempt": row.attempts, "kind": row.kind}
                if oc.kind != SENT and self.metrics:
                    self.metrics.send_failures.labels(oc.kind).inc()
                if oc.kind == SENT:
                    row.state, row.sent_at = DONE, utcnow()
                    audit.record(s, "outbox.sent", reason=oc.reason, detail=detail, **fields)
                    sent += 1
                elif oc.kind == PERMANENT or row.attempts >= max_attempts:
                    row.state = DEAD
                    why = oc.reason if oc.kind == PERMANENT else f"gave up after {row.attempts} attempts: {oc.reason}"
                    row.last_error = why
                    audit.record(s, "outbox.dead", "failure", reason=why, detail=detail, **fields)
                    log.error("dead-lettered %s for %s: %s", row.sop_instance_uid, row.destination, why)
                else:
                    delay = self.backoff(row.attempts)
                    row.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
                    detail["retry_in_seconds"] = round(delay, 1)
                    audit.record(s, "outbox.retry", "failure", reason=oc.reason, detail=detail, **fields)
                    log.warning("send of %s to %s failed (%s); retry %d in %.0fs", row.sop_instance_uid,
                                row.destination, oc.reason, row.attempts + 1, delay)
        return sent

    # ----------------------------------------------------------------------------- admin

    def list(self, state: str | None = None) -> list[OutboxItem]:
        with self.db.session() as s:
            q = select(OutboxItem).order_by(OutboxItem.id)
            if state:
                q = q.where(OutboxItem.state == state)
            return list(s.scalars(q))

    def retry(self, ids: Sequence[int] = (), all_dead: bool = False, by: str | None = None) -> int:
        """Put dead (or pending) items back to pending, due now, attempts reset. ``by``: the web
        console user who asked (recorded in the audit rows)."""
        from cxr_node.outbox.requeue import requeue

        return requeue(self.db, OutboxItem, "outbox.requeued",
                       lambda r: {"destination": r.destination, "id": r.id}, ids, all_dead, by)

    def purge(self, states: Sequence[str], older_than_days: float | None = None, by: str | None = None) -> int:
        """Delete sent and/or dead items (rows and files). Pending items are never purged. ``by``:
        the web console user who asked (recorded in the audit rows)."""
        if PENDING in states:
            raise ConfigError("pending items cannot be purged: they have not been sent yet (retry or wait)")
        n = 0
        with self.db.transaction() as s:
            q = select(OutboxItem).where(OutboxItem.state.in_(list(states)))
            if older_than_days is not None:
                q = q.where(OutboxItem.created_at < utcnow() - dt.timedelta(days=older_than_days))
            rows = list(s.scalars(q.with_for_update()))
            for row in rows:
                still_needed = s.scalar(select(OutboxItem.id).where(
                    OutboxItem.path == row.path, OutboxItem.id != row.id, OutboxItem.state == PENDING))
                if not still_needed:
                    (self.dir / row.path).unlink(missing_ok=True)
                s.delete(row)
                audit.record(s, "outbox.purged", study_uid=row.study_uid, sop_instance_uid=row.sop_instance_uid,
                             detail={"destination": row.destination, "state": row.state, "id": row.id,
                                     **({"user": by} if by else {})})
                n += 1
        return n
