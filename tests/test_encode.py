"""The objects sent back: Secondary Capture and TID 1500 SR, checked by dciodvfy, pixelmed's SR
validator and a highdicom read-back, built from a real Predictor on a real CR chest film."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom import dcmread

from cxr_node.encode.identity import MANUFACTURER, ModelIdentity, derived_uid
from cxr_node.encode.sc import build_sc
from cxr_node.encode.sr import AnalysedFilm, build_sr, read_findings
from helpers_model import make_checkpoint
from validators import dciodvfy_errors, pixelmed_sr_errors

THRESHOLDS = {"COVID": 0.3, "Normal": 0.5, "Viral Pneumonia": 0.4}


def _ours(ds):
    return [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, films):
    from cxr_node.model.infer import Predictor

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", input_size=64, thresholds=THRESHOLDS)
    predictor = Predictor(ckpt, device="cpu")
    source = dcmread(films["RG1_UNCR"])
    source.AccessionNumber = "ACC-4711"
    x, film = predictor.preprocess_with_display(source)
    (pred,) = predictor.predict([x], explain=True)
    pred = predictor.policy.apply(pred)
    model = ModelIdentity.from_meta(predictor.meta)
    return source, film, pred, model


def test_secondary_capture(analysed, tmp_path):
    source, film, pred, model = analysed
    sc = build_sc(source, film, pred, model, instance_number=1)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = dcmread(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.BurnedInAnnotation == "YES" and list(back.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert back.ConversionType == "WSD" and back.BodyPartExamined == "CHEST"
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (eq,) = _ours(back)
    assert eq.DeviceUID == model.device_uid and eq.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"
    assert any(model.version in v for v in eq.SoftwareVersions)
    px = back.pixel_array
    assert px.ndim == 3 and px.shape[2] == 3
    strip = px[-(px.shape[0] // 6):]  # the legend strip below the film: black, with text
    assert np.median(strip) < 10
    yellow = (strip[..., 0] > 200) & (strip[..., 1] > 150) & (strip[..., 2] < 80)  # "NOT FOR DIAGNOSTIC USE"
    assert yellow.sum() > 50
    body = px[: px.shape[0] // 2]
    assert np.median(body) > 20  # the film itself is there, not black
    # deterministic identity: same source + weights -> same UIDs; new weights -> new UIDs
    again = build_sc(source, film, pred, model, instance_number=1)
    assert again.SOPInstanceUID == sc.SOPInstanceUID and again.SeriesInstanceUID == sc.SeriesInstanceUID
    other = dataclasses.replace(model, weights_sha256="f" * 64)
    assert build_sc(source, film, pred, other, instance_number=1).SOPInstanceUID != sc.SOPInstanceUID


def test_structured_report_validates_and_reads_back(analysed, tmp_path):
    source, film, pred, model = analysed
    sc = build_sc(source, film, pred, model, instance_number=1)
    sr = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert pixelmed_sr_errors(path) == []

    back = dcmread(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.AccessionNumber == "ACC-4711"
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "COMPLETE"
    assert back.ReferencedRequestSequence[0].AccessionNumber == "ACC-4711"
    assert [e.DeviceUID for e in _ours(back)] == [model.device_uid]
    (scheme,) = back.CodingSchemeIdentificationSequence  # our private scheme is declared in the SR
    assert scheme.CodingSchemeDesignator == "99CXRNODE" and scheme.CodingSchemeResponsibleOrganization == MANUFACTURER
    (group,) = read_findings(back)
    assert group["finding"] in ("COVID-19", "Normal", "Viral pneumonia")
    probs = group["probabilities"]
    assert probs == pytest.approx({"COVID-19": pred.probabilities[0], "Normal": pred.probabilities[1],
                                   "Viral pneumonia": pred.probabilities[2]}, abs=1e-6)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    expected = {"COVID-19": pred.probabilities[0] >= 0.3, "Normal": pred.probabilities[1] >= 0.5,
                "Viral pneumonia": pred.probabilities[2] >= 0.4}
    assert group["evaluations"] == {k: "Present" if v else "Absent" for k, v in expected.items()}
    assert group["source_sop_uids"] == [source.SOPInstanceUID, sc.SOPInstanceUID]
    assert group["tracking_uid"] == model.tracking_uid(source.SOPInstanceUID)


def test_revised_report_names_its_predecessor(analysed, tmp_path):
    source, film, pred, model = analysed
    sc = build_sc(source, film, pred, model, instance_number=1)
    v1 = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1)
    v2 = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=2, predecessor=v1)
    assert v2.SOPInstanceUID != v1.SOPInstanceUID and v2.SeriesInstanceUID == v1.SeriesInstanceUID
    ref = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == v1.SOPInstanceUID
    path = tmp_path / "sr2.dcm"
    v2.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert build_sr([AnalysedFilm(source, sc, pred)], model, study_version=2, predecessor=v1).SOPInstanceUID \
        == v2.SOPInstanceUID  # a retry mints the same UID


def test_derived_uids_are_valid_and_stable():
    u = derived_uid("a", "b")
    assert u == derived_uid("a", "b") != derived_uid("a", "c")
    assert u.startswith("2.25.") and len(u) <= 64 and u.replace(".", "").isdigit()
