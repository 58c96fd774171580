"""The outbox sends the most urgent results first (a backlog after a PACS outage, or more than one drain
holds): a study version the node called urgent, then the sender's DIMSE Priority, then queue order.
The outbox in process, on SQLite and on PostgreSQL, sending to a real dcmtk storescp."""

from __future__ import annotations

import pytest
from conftest import StoreSCP
from dicomgen import make_cr, uid
from pydicom import dcmread

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import AuditEvent, ImageResult, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.outbox.queue import Outbox, WrittenObject
from cxr_node.study.scheduling import dimse_rank


def _study(box: Outbox, study_uid: str, films: int, *, urgent: bool = False, dimse_priority: int | None = None,
           version: int = 1) -> list[str]:
    """A processed study version with ``films`` result files queued for "pacs"; returns their SOP UIDs."""
    now = utcnow()
    objs = []
    for i in range(films):
        rel = f"{study_uid}/{i}.dcm"
        path = make_cr(box.dir / rel, study_uid=study_uid, rows=64, cols=64, seed=i)
        ds = dcmread(path, stop_before_pixels=True)
        objs.append(WrittenObject(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, "sc", rel))
    with box.db.transaction() as s:
        s.add(Study(study_uid=study_uid, state="processed", version=version, first_received_at=now,
                    last_received_at=now, state_changed_at=now,
                    upstream_rank=None if dimse_priority is None else dimse_rank(dimse_priority)))
        for o in objs:
            s.add(ImageResult(study_uid=study_uid, study_version=version, sop_instance_uid=o.sop_instance_uid,
                              analysed=True, urgent=urgent, priority="urgent" if urgent else "routine",
                              created_at=now))
        assert box.enqueue(s, objs, study_uid, version) == films
    return [o.sop_instance_uid for o in objs]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_urgent_results_go_first_then_the_senders_priority_then_queue_order(tmp_path, request, database):
    db_section = {"url": request.getfixturevalue("postgres").url} if database == "postgresql" else {}
    with StoreSCP(tmp_path / "pacs") as pacs:
        settings = config.parse({"storage": {"data_dir": str(tmp_path / "node")}, "database": db_section,
                                 "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                   "port": pacs.port}]}, base_dir=tmp_path)
        migrate.upgrade(settings.database.url)
        db = Database(settings.database.url)
        box = Outbox(settings, db)
        box.prepare()
        try:
            # queued in this order while the PACS was away: routine, then HIGH priority, then urgent
            routine = _study(box, uid(), 3)
            high = _study(box, uid(), 2, dimse_priority=0x0001)
            low = _study(box, uid(), 1, dimse_priority=0x0002)
            urgent = _study(box, uid(), 2, urgent=True)
            assert box.drain() == 8
            with db.session() as s:
                sent = [e.sop_instance_uid for e in s.query(AuditEvent).filter(AuditEvent.event == "outbox.sent")
                        .order_by(AuditEvent.id)]
        finally:
            db.dispose()
    arrived = [dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in sorted(pacs.out_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)]
    expected = urgent + high + routine + low
    assert sent == expected
    assert arrived == expected  # the order on the wire, as storescp wrote the files
