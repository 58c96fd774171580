"""Study completion by association release (issue 22): a study sent in one association and
released is complete once nothing more arrives for [study] release_grace_seconds; the quiet period
stays the rule for studies over several associations and for senders that keep theirs open; a late
film reopens the study. Real daemon, real storescu, a pynetdicom SCU for the open association, and
Orthanc as the PACS."""

from __future__ import annotations

import io
import time

from pydicom import dcmread

from conftest import free_port, storescu, wait_until
from cxr_node.encode.sr import read_findings
from dicomgen import make_cr, uid
from helpers_model import bundled_or_tiny

NO_MODEL = '[model]\ncheckpoint = "/nonexistent/model.pt"\npreload = false\n'  # processing fails at once: cheap


def _complete(node, study):
    return [r for r in node.audit("--study", study) if r["event"] == "study.complete"]


def _state(node, study):
    with node.db() as c:
        return c.execute("select state, version from studies where study_uid=?", (study,)).fetchone()


def test_release_completes_the_study_after_the_grace_and_a_late_film_reopens_it(node_factory, tmp_path):
    n = node_factory("rel", quiet_seconds=120, study_extra="release_grace_seconds = 1", extra=NO_MODEL).start()
    study = uid()
    films = [make_cr(tmp_path / f"{i}.dcm", study_uid=study, seed=i, rows=128, cols=128) for i in range(2)]
    assert storescu(n.port, *films).returncode == 0
    done = time.monotonic()
    (complete,) = n.wait_for_event("study.complete", study_uid=study, timeout=30)
    n.wait_for_event("study.queued", study_uid=study)
    assert time.monotonic() - done < 60  # far inside the 120 s quiet period
    assert complete["detail"]["rule"] == "release" and complete["detail"]["grace_seconds"] == 1
    assert complete["detail"]["instances"] == 2
    (released,) = n.events("association.released")
    assert complete["detail"]["association_id"] == released["association_id"]
    assert "released" in complete["reason"]

    # a late film: a new version, completed by its own association's release
    assert storescu(n.port, make_cr(tmp_path / "late.dcm", study_uid=study, seed=7, rows=128, cols=128)).returncode == 0
    (reopened,) = n.wait_for_event("study.reopened", study_uid=study)
    assert reopened["detail"]["version"] == 2
    wait_until(lambda: len(_complete(n, study)) == 2, 30, "version 2 complete", n)
    v2 = _complete(n, study)[-1]
    assert v2["detail"]["version"] == 2 and v2["detail"]["rule"] == "release" and v2["detail"]["instances"] == 3


def test_films_over_several_associations_wait_for_the_quiet_period(node_factory, tmp_path):
    n = node_factory("several", quiet_seconds=12, study_extra="release_grace_seconds = 5", extra=NO_MODEL).start()
    study = uid()
    assert storescu(n.port, make_cr(tmp_path / "a.dcm", study_uid=study, seed=1, rows=128, cols=128)).returncode == 0
    assert storescu(n.port, make_cr(tmp_path / "b.dcm", study_uid=study, seed=2, rows=128, cols=128)).returncode == 0
    sent = time.monotonic()
    time.sleep(7)  # past both releases' grace
    assert _state(n, study)[0] == "receiving", n.log[-2000:]
    (complete,) = n.wait_for_event("study.complete", study_uid=study, timeout=30)
    assert complete["detail"]["rule"] == "quiet" and complete["detail"]["quiet_seconds"] == 12
    assert time.monotonic() - sent >= 10


def test_a_sender_that_keeps_its_association_open_waits_for_the_quiet_period(node_factory, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    n = node_factory("open", quiet_seconds=6, study_extra="release_grace_seconds = 1", extra=NO_MODEL).start()
    study = uid()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", n.port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(make_cr(tmp_path / "o.dcm", study_uid=study, seed=3, rows=128, cols=128))
        assert status.Status == 0
        time.sleep(3)  # past the grace: no release, so nothing completes it
        assert _state(n, study)[0] == "receiving"
    finally:
        assoc.abort()  # an abort is not a release either
    (complete,) = n.wait_for_event("study.complete", study_uid=study, timeout=30)
    assert complete["detail"]["rule"] == "quiet"


def test_results_reach_orthanc_long_before_the_quiet_period(node_factory, orthanc_factory, tmp_path):
    """The shipped grace, a quiet period far longer than the test may take: the SR and SC of a
    study sent by storescu reach Orthanc; a late film sends a new SR version."""
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    ckpt = bundled_or_tiny(tmp_path / "model")
    node = node_factory("fast", port=node_port, quiet_seconds=600, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    node.start()
    node.wait_log(" loaded from ", timeout=180)  # the model (preload)
    study = uid()
    assert storescu(node_port, make_cr(tmp_path / "f.dcm", study_uid=study, rows=512, cols=512)).returncode == 0
    t0 = time.monotonic()
    (sr,) = wait_until(lambda: orthanc.find(StudyInstanceUID=study, Modality="SR"), 300, "no SR in Orthanc", node)
    (sc,) = wait_until(lambda: orthanc.find(StudyInstanceUID=study, Modality="OT"), 60, "no SC in Orthanc", node)
    took = time.monotonic() - t0
    (complete,) = node.events("study.complete", study_uid=study)
    assert complete["detail"]["rule"] == "release" and took < 600

    late = make_cr(tmp_path / "late.dcm", study_uid=study, seed=5, rows=512, cols=512)
    assert storescu(node_port, late).returncode == 0
    srs = wait_until(lambda: (lambda f: f if len(f) == 2 else None)(orthanc.find(StudyInstanceUID=study, Modality="SR")),
                     300, "no second SR version", node)
    new = next(dcmread(io.BytesIO(orthanc.file(i["ID"]))) for i in srs if i["ID"] != sr["ID"])
    assert new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == sr["MainDicomTags"]["SOPInstanceUID"]
    assert len(read_findings(new)) == 2
    assert [r["detail"]["rule"] for r in node.events("study.complete", study_uid=study)] == ["release", "release"]
