"""End to end against a real PACS: Orthanc pushes studies to cxr-node, and cxr-node's results (a
Secondary Capture per film, an SR per study) land back in Orthanc, in the same study."""

from __future__ import annotations

import io

import pytest
from conftest import free_port, storescu
from conftest import wait_until as _wait
from dicomgen import make_cr, uid
from helpers_model import bundled_or_tiny
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage

from cxr_node.encode.identity import MANUFACTURER
from cxr_node.encode.sr import read_findings, read_report


def _setup(node_factory, orthanc_factory, tmp_path, name="cxr"):
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    ckpt = bundled_or_tiny(tmp_path / "model")
    node = node_factory(name, port=node_port, quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.5\nretry_base_seconds = 1\nretry_max_seconds = 2\nmax_attempts = 200\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    node.start()
    return node, orthanc




def test_results_reach_the_pacs_in_the_same_study(node_factory, orthanc_factory, films, tmp_path):
    node, orthanc = _setup(node_factory, orthanc_factory, tmp_path)
    ids = [orthanc.upload(films[n]) for n in ("RG1_UNCR", "RG1_J2KR", "RG3_J2KI")]
    orthanc.rest("POST", "/modalities/cxrnode/store", {"Resources": ids, "Synchronous": True})
    study = dcmread(films["RG1_UNCR"], stop_before_pixels=True).StudyInstanceUID
    tibia_study = dcmread(films["RG3_J2KI"], stop_before_pixels=True).StudyInstanceUID

    srs = _wait(lambda: orthanc.find(StudyInstanceUID=study, Modality="SR"), 180, "no SR in Orthanc", node)
    scs = _wait(lambda: [i for i in orthanc.find(StudyInstanceUID=study)
                         if i["MainDicomTags"].get("SOPInstanceUID", "").startswith("2.25.")
                         and i["ID"] != srs[0]["ID"]], 60, "no Secondary Captures in Orthanc", node)
    assert len(srs) == 1 and len(scs) == 2

    sr = dcmread(io.BytesIO(orthanc.file(srs[0]["ID"])))
    sc_sets = [dcmread(io.BytesIO(orthanc.file(i["ID"]))) for i in scs]
    sources = {dcmread(films[n], stop_before_pixels=True).SOPInstanceUID for n in ("RG1_UNCR", "RG1_J2KR")}
    assert {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in sc_sets} == sources
    for sc in sc_sets:
        assert sc.StudyInstanceUID == study and sc.BurnedInAnnotation == "YES"
        (eq,) = [e for e in sc.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
        assert eq.DeviceUID and eq.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    groups = read_findings(sr)
    assert len(groups) == 2
    for g in groups:
        assert sum(g["probabilities"].values()) == pytest.approx(1.0, abs=2e-3)  # 3 significant digits
        assert g["source_sop_uids"][0] in sources
        assert g["source_sop_uids"][1] in {sc.SOPInstanceUID for sc in sc_sets}
    assert sr.SOPClassUID == ComprehensiveSRStorage  # a class every viewer opens: no 3D coordinates are written
    assert [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
    # the same film in two encodings gives the same answer
    p1, p2 = (g["probabilities"] for g in groups)
    assert p1 == pytest.approx(p2, abs=2e-3)

    # the tibia: stored, not analysed, no overlay, no flag and no SR (not a chest film by its header);
    # the trail says why
    (done,) = node.wait_for_event("study.processed", timeout=60, study_uid=tibia_study)
    (skip,) = node.events("image.skipped", study_uid=tibia_study)
    assert "BodyPartExamined is EXTREMITY" in skip["reason"]
    assert done["reason"].startswith("no film was analysed: BodyPartExamined is EXTREMITY")
    assert done["detail"]["objects"] == 0 and done["detail"]["priority"] is None
    assert len(orthanc.find(StudyInstanceUID=tibia_study)) == 1  # the film only

    triaged = node.events("image.triaged", study_uid=study)
    assert len(triaged) == 2 and all(r["detail"]["model_version"] for r in triaged)
    sent = node.events("outbox.sent", study_uid=study)
    assert sorted(r["sop_instance_uid"] for r in sent) == sorted(
        [sr.SOPInstanceUID] + [sc.SOPInstanceUID for sc in sc_sets])


def test_pacs_outage_results_arrive_exactly_once_after_restart(node_factory, orthanc_factory, tmp_path):
    node, orthanc = _setup(node_factory, orthanc_factory, tmp_path, name="outage")
    orthanc.stop()
    study = uid()
    assert storescu(node.port, make_cr(tmp_path / "f1.dcm", study_uid=study, rows=512, cols=512)).returncode == 0
    node.wait_for_event("outbox.retry", study_uid=study, timeout=120)
    # still receiving while the PACS is down
    other = uid()
    assert storescu(node.port, make_cr(tmp_path / "f2.dcm", study_uid=other, rows=512, cols=512)).returncode == 0
    pending = [r for r in node.audit("--event", "outbox.queued") if r["study_uid"] == study]
    assert len(pending) == 2  # SC + SR

    orthanc.start()
    results = _wait(lambda: (len([i for i in orthanc.find(StudyInstanceUID=study)]) == 2
                             and orthanc.find(StudyInstanceUID=study)), 120, "results after the restart", node)
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in results} == {r["sop_instance_uid"] for r in pending}
    _wait(lambda: len(node.events("outbox.sent", study_uid=other)) == 2, 120, "second study's results", node)
    sent = node.events("outbox.sent", study_uid=study)
    assert sorted(r["sop_instance_uid"] for r in sent) == sorted(r["sop_instance_uid"] for r in pending)  # once each
    assert not node.events("outbox.dead")
    retries = node.events("outbox.retry", study_uid=study)
    assert retries and all("could not associate" in r["reason"] or "cannot reach" in r["reason"] for r in retries)
    assert all(r["detail"]["retry_in_seconds"] > 0 for r in retries)


def test_five_labels_two_critical_classes_reach_the_pacs(node_factory, orthanc_factory, tmp_path):
    """A v4-shaped checkpoint (COVID, Normal, Other pneumonia, Tuberculosis, Viral Pneumonia; COVID and
    Tuberculosis critical, each with its own threshold): the daemon flags a film urgent by the
    Tuberculosis threshold alone; the SR in Orthanc carries five probabilities and both thresholds,
    the Secondary Capture is there, the audit trail gives the reason."""
    from helpers_model import FIVE_LABELS, make_checkpoint

    node_port = free_port()
    orthanc = orthanc_factory().start()
    ckpt = make_checkpoint(tmp_path / "five.pt", labels=FIVE_LABELS, critical=["COVID", "Tuberculosis"],
                           thresholds={"COVID": 1.0, "Tuberculosis": 0.0})
    node = node_factory("five", port=node_port, quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.5\nretry_base_seconds = 1\nretry_max_seconds = 2\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    node.start()
    study = uid()
    film = make_cr(tmp_path / "f.dcm", study_uid=study, rows=128, cols=128, seed=7)
    assert storescu(node.port, film).returncode == 0
    (sr_id,) = _wait(lambda: orthanc.find(StudyInstanceUID=study, Modality="SR"), 180, "no SR in Orthanc", node)
    sr = dcmread(io.BytesIO(orthanc.file(sr_id["ID"])))
    (g,) = read_findings(sr)
    from cxr_node.encode.sr import label_code

    assert set(g["probabilities"]) == {label_code(n).meaning for n in FIVE_LABELS}  # code meanings
    assert sum(g["probabilities"].values()) == pytest.approx(1.0, abs=5e-3)  # five at 3 significant digits
    # each critical class's own operating point, as the Threshold Value beside its probability
    assert g["thresholds"][label_code("COVID").meaning] == pytest.approx(1.0)
    assert g["thresholds"][label_code("Tuberculosis").meaning] == pytest.approx(0.0)
    (t,) = node.events("image.triaged", study_uid=study)
    assert t["detail"]["urgent"] is True and t["detail"]["priority"] == "urgent"
    assert set(t["detail"]["probabilities"]) == set(FIVE_LABELS)
    scs = _wait(lambda: orthanc.find(StudyInstanceUID=study, Modality="OT"), 60, "no Secondary Capture", node)
    assert len(scs) == 1
    (done,) = node.events("study.processed", study_uid=study)
    assert done["detail"]["priority"] == "urgent"


def test_a_v5_model_says_abnormal_first_through_the_real_daemon(node_factory, orthanc_factory, tmp_path):
    """A checkpoint with an abnormality output (the v5 kind) set in [model] checkpoint: the SR in Orthanc
    opens with the call in one sentence on p(abnormal) against the model's operating point, which it says is
    not yet calibrated at this site, its first finding is the abnormality estimate and the classes follow as
    patterns; the worklist's top finding is stored as data ('abnormal')."""
    from helpers_model import make_checkpoint
    from validators import dciodvfy_errors

    from cxr_node.encode import wording

    orthanc = orthanc_factory().start()
    ckpt = make_checkpoint(tmp_path / "v5.pt", thresholds={"COVID": 0.5, "Normal": 0.5, "Viral Pneumonia": 0.5},
                           abnormal_threshold=0.0)  # every film is above 0%: urgent
    node = node_factory("v5", port=free_port(), quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.5\nretry_base_seconds = 1\nretry_max_seconds = 2\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    node.start()
    study = uid()
    assert storescu(node.port, make_cr(tmp_path / "f.dcm", study_uid=study, rows=128, cols=128, seed=3)).returncode == 0
    (sr_id,) = _wait(lambda: orthanc.find(StudyInstanceUID=study, Modality="SR"), 180, "no SR in Orthanc", node)
    raw = orthanc.file(sr_id["ID"])
    (tmp_path / "sr.dcm").write_bytes(raw)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    sr = dcmread(io.BytesIO(raw))
    assert sr.SOPClassUID == ComprehensiveSRStorage
    report = read_report(sr)
    (t,) = node.events("image.triaged", study_uid=study)
    p = t["detail"]["abnormal"]
    assert t["detail"]["priority"] == "urgent" and p is not None
    assert report["summary"] == (f"Urgent: abnormal chest radiograph {wording.percent(p, 2)}, above the model's "
                                 "operating point 0% (not yet calibrated at this site). Research triage, not a diagnosis.")
    (g,) = report["films"]
    assert g["abnormal"] == pytest.approx(p, rel=5e-3) and g["abnormal_threshold"] == 0.0 and g["priority"] == "urgent"
    assert set(g["patterns"]) == {"COVID-19", "Normal", "Viral pneumonia"}
    with node.db() as c:
        assert c.execute("select finding, finding_probability from image_results where study_uid = ?",
                         (study,)).fetchall() == [("abnormal", pytest.approx(p))]


def _texts(ds) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(_texts(item))
    return out
