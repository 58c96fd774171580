"""A malformed film never stalls processing (issue 18, point 1).

A CR film whose NumberOfFrames is ``abc`` (or WindowCenter/RescaleSlope ``abc``, a 3-byte
SamplesPerPixel) is valid enough to be stored; pydicom raised ValueError when the pipeline read it,
which escaped the per-film guard and left every study of the batch in ``processing`` for good.
Now each malformed value is a refusal with its reason, a study that fails is failed (and retried,
bounded, with backoff), and no study is left in processing.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from conftest import StoreSCP, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread

from cxr_node.db.migrate import upgrade
from cxr_node.db.models import Study, utcnow
from cxr_node.db.session import Database
from cxr_node.eligibility import rules as eligibility
from cxr_node.eligibility.refusal import RefusalCode
from cxr_node.errors import PreprocessError
from cxr_node.model.radiograph import dicom_to_float
from cxr_node.study import states as studies

#: What a fuzzer or a broken modality sends, as the raw bytes of one element (Explicit VR LE).
MALFORMED = {
    "NumberOfFrames": {"NumberOfFrames": ("IS", b"abc ")},
    "WindowCenter": {"WindowCenter": ("DS", b"abc "), "WindowWidth": ("DS", b"400 ")},
    "WindowWidth": {"WindowCenter": ("DS", b"2000"), "WindowWidth": ("DS", b"x1")},
    "RescaleSlope": {"RescaleSlope": ("DS", b"abc ")},
    "RescaleIntercept": {"RescaleIntercept": ("DS", b"--1.")},
    "SamplesPerPixel": {"SamplesPerPixel": ("US", b"\x01\x00\x00")},
    "Rows": {"Rows": ("US", b"\x80\x00\x00")},
    "BitsStored": {"BitsStored": ("US", b"\x0c")},
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_each_malformed_header_value_is_a_refusal_not_an_exception(kind, tmp_path):
    path = make_cr(tmp_path / f"{kind}.dcm", rows=96, cols=96, raw=MALFORMED[kind])
    ds = dcmread(path)
    assert eligibility.header_reason(ds) is None  # the chest/PA header itself is fine
    with pytest.raises(PreprocessError) as e:
        dicom_to_float(ds)
    reason = str(e.value)
    assert reason.startswith("unusable header") or "cannot be decoded" in reason, reason
    refusal = eligibility.preprocess_refusal(e.value)  # what the pipeline records
    assert refusal.code == (RefusalCode.UNREADABLE if reason.startswith("unusable header") else RefusalCode.PIXELS)


class _Unreadable(dict):
    """A header whose one element raises on reading, as pydicom does for a malformed value."""

    def __init__(self, keyword: str) -> None:
        super().__init__(BodyPartExamined="CHEST", ViewPosition="PA")
        self.keyword = keyword

    def get(self, key, default=None):
        if key == self.keyword:
            raise ValueError("Invalid value for VR CS: 'Smith^John'")
        return super().get(key, default)


@pytest.mark.parametrize("keyword", ["BodyPartExamined", "ViewPosition"])
def test_header_rules_name_an_unreadable_element_never_its_value(keyword):
    reason = eligibility.header_reason(_Unreadable(keyword))
    assert reason == f"unusable header: {keyword} cannot be read (ValueError)"
    assert reason.code == RefusalCode.UNREADABLE


# --------------------------------------------------------------------------- the state machine, in process

@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'cxr-node.db'}"
    upgrade(url)
    d = Database(url)
    yield d
    d.dispose()


def _queued_study(db: Database) -> str:
    study = uid()
    now = utcnow()
    with db.transaction() as s:
        studies.note_instance(s, study, "PID", now)
    studies.complete_quiet_studies(db, 0.0)
    return study


def _state(db: Database, study: str) -> Study:
    with db.session() as s:
        st = s.get(Study, study)
        s.expunge(st)
        return st


def test_a_failed_study_is_retried_with_backoff_then_given_up(db):
    study = _queued_study(db)
    for attempt in (1, 2, 3):
        assert studies.claim(db, 8, "n1") == [(study, 1)]
        retry_at = studies.fail(db, study, 1, "boom", max_attempts=3, retry_seconds=10)
        st = _state(db, study)
        assert st.state == studies.FAILED and st.attempts == attempt and st.last_error == "boom"
        if attempt < 3:
            wait = (retry_at - utcnow()).total_seconds()
            assert 10 * 2 ** (attempt - 1) - 2 < wait <= 10 * 2 ** (attempt - 1)  # doubling backoff
            assert studies.retry_failed(db) == []  # not yet
            assert studies.retry_failed(db, now=retry_at + dt.timedelta(seconds=1)) == [study]
            assert _state(db, study).state == studies.QUEUED
        else:
            assert retry_at is None and st.retry_at is None  # final: nothing queues it again
            assert studies.retry_failed(db, now=utcnow() + dt.timedelta(days=2)) == []
    # a late instance starts a new version with no attempts
    with db.transaction() as s:
        assert studies.note_instance(s, study, "PID", utcnow()) == 2
    assert _state(db, study).attempts == 0


def test_a_study_that_keeps_killing_the_daemon_fails_at_start_up(db):
    study = _queued_study(db)
    for attempt in (1, 2):
        studies.claim(db, 8, "n1")
        assert studies.requeue_interrupted(db, "n1", max_attempts=2) == (1 if attempt < 2 else 0)
    st = _state(db, study)
    assert st.state == studies.FAILED and "interrupted 2 time(s)" in st.last_error
    assert studies.still_processing(db, [(study, 1)]) == []


# --------------------------------------------------------------------------- the real daemon

def test_a_poison_film_does_not_stall_the_study_sent_with_it(node_factory, tmp_path):
    """The smallest reproduction from the fuzz run: one poison study and one clean study sent
    together. Both used to stay in processing for good."""
    ckpt = make_checkpoint(tmp_path / "model.pt", input_size=64)
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = node_factory("poison", quiet_seconds=1, extra=(
            f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n[outbox]\npoll_seconds = 0.3\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'))
        node.start()
        clean, poison = uid(), uid()
        files = [make_cr(tmp_path / "clean.dcm", study_uid=clean, rows=128, cols=128),
                 make_cr(tmp_path / "poison.dcm", study_uid=poison, rows=128, cols=128,
                         raw=MALFORMED["NumberOfFrames"])]
        assert storescu(node.port, *files).returncode == 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(node.events("outbox.sent", study_uid=clean)) < 2
                                               or not node.events("study.processed", study_uid=poison)):
            time.sleep(0.4)
        assert len(node.events("outbox.sent", study_uid=clean)) == 2, node.log[-3000:]  # SC + SR
        (skipped,) = node.events("image.skipped", study_uid=poison)
        assert skipped["reason"].startswith("unusable header: NumberOfFrames cannot be read"), skipped
        # the poison study is finished, and its SR says why the film was not analysed
        assert node.events("study.processed", study_uid=poison)
        with node.db() as c:
            states = dict(c.execute("select study_uid, state from studies").fetchall())
        assert states == {clean: "processed", poison: "processed"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(pacs.out_dir.iterdir())) < 3:
            time.sleep(0.3)
        sent = [dcmread(p) for p in pacs.out_dir.iterdir()]
        (sr,) = [d for d in sent if d.StudyInstanceUID == poison]
        assert sr.Modality == "SR"
        assert "Traceback" not in node.log
    assert node.stop() == 0


def test_a_failure_reason_never_carries_a_quoted_dataset_value(tmp_path, caplog):
    """A study's failure reason is often an exception's text; pydicom and highdicom quote the
    values they judge, a patient's name among them. Neither the audit trail nor the log gets it."""
    from cxr_node import config
    from cxr_node.db.models import AuditEvent
    from cxr_node.outbox.queue import Outbox
    from cxr_node.study.pipeline import Processor

    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    study = _queued_study(db)
    studies.claim(db, 8, "local")
    with caplog.at_level("DEBUG"):
        Processor(settings, db, Outbox(settings, db)).fail(
            study, 1, "ValueError: Invalid value for VR PN: 'Quokkafield^Zebediah'")
    st = _state(db, study)
    with db.session() as s:
        (ev,) = s.query(AuditEvent).filter(AuditEvent.event == "study.failed").all()
    assert st.state == studies.FAILED and "Invalid value for VR PN" in st.last_error
    for text in (st.last_error, ev.reason, caplog.text):
        assert "Quokkafield" not in text
    db.dispose()
