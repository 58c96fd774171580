"""Retention: delete spooled films, sent result files and sent notification messages older than
``[retention] days``.

Never removes a film of a study that is not finished (receiving .. processing) or that has any
result still pending or dead-lettered, and never a result file that is not sent. Rows stay (with
``removed_at``) so the audit trail and `outbox list` keep the history; every deletion is audited.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import select

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import Instance, Notification, OutboxItem, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.study.states import FINISHED

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RetentionReport:
    films: int
    results: int
    kept_unsent: int


def run_retention(settings: Settings, db: Database, days: float | None = None) -> RetentionReport:
    days = settings.retention.days if days is None else days
    if days <= 0:
        return RetentionReport(0, 0, 0)
    cutoff = utcnow() - dt.timedelta(days=days)
    films = results = kept = 0
    with db.transaction() as s:
        unsent = set(s.scalars(select(OutboxItem.study_uid).where(OutboxItem.state.in_(["pending", "dead"]))))
        old = s.scalars(select(Instance).where(Instance.removed_at.is_(None), Instance.received_at < cutoff)
                        .with_for_update()).all()
        for inst in old:
            study = s.get(Study, inst.study_uid)
            if inst.study_uid in unsent or study is None or study.state not in FINISHED:
                kept += 1
                continue
            (settings.storage.spool_dir / inst.path).unlink(missing_ok=True)
            inst.removed_at = utcnow()
            audit.record(s, "retention.removed", study_uid=inst.study_uid, sop_instance_uid=inst.sop_instance_uid,
                         sop_class_uid=inst.sop_class_uid, patient_id=inst.patient_id,
                         detail={"kind": "film", "path": inst.path, "days": days})
            films += 1
        sent = s.scalars(select(OutboxItem).where(OutboxItem.state == "sent", OutboxItem.removed_at.is_(None),
                                                  OutboxItem.sent_at < cutoff).with_for_update()).all()
        for item in sent:
            pending_same_file = s.scalar(select(OutboxItem.id).where(
                OutboxItem.path == item.path, OutboxItem.state.in_(["pending", "dead"])))
            if pending_same_file:  # another destination still needs this file
                kept += 1
                continue
            (settings.storage.outbox_dir / item.path).unlink(missing_ok=True)
            item.removed_at = utcnow()
            audit.record(s, "retention.removed", study_uid=item.study_uid, sop_instance_uid=item.sop_instance_uid,
                         sop_class_uid=item.sop_class_uid,
                         detail={"kind": f"result-{item.kind}", "path": item.path, "destination": item.destination,
                                 "days": days})
            results += 1
        for note in s.scalars(select(Notification).where(Notification.state == "sent", Notification.removed_at.is_(None),
                                                         Notification.sent_at < cutoff).with_for_update()):
            (settings.storage.outbox_dir / note.path).unlink(missing_ok=True)  # it holds the patient's name
            note.removed_at = utcnow()
            audit.record(s, "retention.removed", study_uid=note.study_uid,
                         detail={"kind": f"notification-{note.kind}", "path": note.path, "channel": note.channel,
                                 "days": days})
            results += 1
    if films or results:
        log.info("retention (%g days): removed %d film(s) and %d sent result file(s); kept %d not yet done",
                 days, films, results, kept)
    return RetentionReport(films, results, kept)
