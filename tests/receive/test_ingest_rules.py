"""Ingest's rules, in process and fast (the real C-STOREs are in test_receive.py): what a dataset
must have to be trusted, one copy per SOP Instance UID, and non-triage classes kept but marked."""

from __future__ import annotations

import pytest
from dicomgen import make_cr, make_truncated
from pydicom.uid import CTImageStorage

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import AuditEvent, Instance
from cxr_node.db.session import Database
from cxr_node.errors import InvalidInstanceError
from cxr_node.receive.association import AssociationInfo
from cxr_node.receive.ingest import Ingest, read_header
from cxr_node.receive.spool import Spool


@pytest.fixture
def ingest(tmp_path):
    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    spool = Spool(settings.storage.spool_dir, settings.storage.incoming_dir / "t")
    spool.prepare()
    yield Ingest(db, spool)
    db.dispose()


def test_a_second_copy_is_a_duplicate_stored_once(ingest, tmp_path):
    data = make_cr(tmp_path / "a.dcm", rows=32, cols=32).read_bytes()
    h = read_header(data)
    assoc = AssociationInfo("a1", "MODALITY", "CXRNODE", "127.0.0.1", 4000)
    assert ingest.store(data, h, "1.2.840.10008.1.2.1", assoc) is True
    assert ingest.store(data, h, "1.2.840.10008.1.2.1", assoc) is False
    assert len(list(ingest.spool.spool_dir.rglob("*.dcm"))) == 1
    with ingest.db.session() as s:
        assert s.query(Instance).count() == 1
        (dup,) = s.query(AuditEvent).filter(AuditEvent.event == "instance.duplicate").all()
        assert dup.sop_instance_uid == h.sop_instance_uid and dup.calling_aet == "MODALITY"


def test_a_class_cxr_node_does_not_triage_is_kept_and_marked_with_its_code(ingest, tmp_path):
    data = make_cr(tmp_path / "ct.dcm", rows=32, cols=32, sop_class=CTImageStorage).read_bytes()
    assert ingest.store(data, read_header(data), "1.2.840.10008.1.2.1", None) is True
    with ingest.db.session() as s:
        (inst,) = s.query(Instance).all()
        (ev,) = s.query(AuditEvent).filter(AuditEvent.event == "instance.not_for_triage").all()
    assert inst.triage_eligible is False and "not a radiograph class" in inst.not_for_triage_reason
    assert ev.detail["refusal_code"] == "sop_class" and ev.outcome == "warning"  # stored, but refused for triage


@pytest.mark.parametrize("case, expect", [
    ("missing", "missing SeriesInstanceUID"),
    ("malformed", "malformed StudyInstanceUID"),
    ("truncated", "does not decode"),
])
def test_what_is_not_trusted(case, expect, tmp_path):
    if case == "missing":
        data = make_cr(tmp_path / "m.dcm", rows=32, cols=32, omit=("SeriesInstanceUID",)).read_bytes()
    elif case == "malformed":
        data = make_cr(tmp_path / "b.dcm", rows=32, cols=32, study_uid="1.2.3.abc").read_bytes()
    else:
        data = make_truncated(tmp_path / "t.dcm").read_bytes()
    with pytest.raises(InvalidInstanceError, match=expect):
        read_header(data)
