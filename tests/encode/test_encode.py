"""The objects sent back: Secondary Capture and TID 1500 SR, checked by dciodvfy, pixelmed's SR
validator and a highdicom read-back, built from a real Predictor on a real CR chest film."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers_model import make_checkpoint
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage
from validators import dciodvfy_errors, saved_valid_sr

from cxr_node.encode.identity import MANUFACTURER, ModelIdentity, derived_uid
from cxr_node.encode.sc import build_sc
from cxr_node.encode.sr import AnalysedFilm, build_sr, read_findings

THRESHOLDS = {"COVID": 0.3, "Normal": 0.5, "Viral Pneumonia": 0.4}


def _ours(ds):
    return [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from cxr_node.model.infer import Predictor

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", input_size=64, thresholds=THRESHOLDS)
    return Predictor(ckpt, device="cpu")


@pytest.fixture(scope="module")
def analysed(predictor, films):
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


def _coloured(px):
    """Pixels of an RGB picture that are not grey (a heat map was blended in)."""
    px = px.astype(int)
    return (np.abs(px[..., 0] - px[..., 1]) > 12) | (np.abs(px[..., 1] - px[..., 2]) > 12)


def test_secondary_capture_keeps_the_film_legible_and_maps_only_a_flag(analysed, predictor, tmp_path):
    """The SC at the source's resolution (up to the configured rows), the legend scaled to it and
    naming the operating point; a map only for the flagged finding, over part of the film only;
    none for a routine call."""
    from cxr_node.encode.overlay import legend_size
    from cxr_node.model.policy import Decision, Finding
    from cxr_node.model.preprocess import prepare

    source, _, pred, model = analysed
    pr = prepare(source, predictor.params, None)
    assert pr.film.shape == (source.Rows, source.Columns)
    # flagged for COVID at an operating point of 0, with the map made for COVID
    flagged_model = dataclasses.replace(model, thresholds={"COVID": 0.0, "Normal": 0.5, "Viral Pneumonia": 0.4})
    flagged = Finding(dataclasses.replace(pred.prediction, cam_label="COVID", top_label="COVID"),
                      Decision(True, "urgent", ("COVID above",)))
    sc = build_sc(source, pr.film, flagged, flagged_model, instance_number=1)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    px = dcmread(path).pixel_array
    rows = source.Rows  # 1955 <= the default 2048: the film keeps its resolution
    assert px.shape[1] == source.Columns and px.shape[0] > rows
    film_part, legend = px[:rows], px[rows:]
    assert 0 < _coloured(film_part).mean() < 0.5  # a map, not over the whole film
    assert legend.shape[0] >= 5 * legend_size(rows, source.Columns)  # five lines at least, scaled to the film
    assert legend_size(rows, source.Columns) >= 40  # ~2% of the height: 43 px letters on a 1955-row film

    routine = Finding(pred.prediction, Decision(False, "routine", ()))
    px = build_sc(source, pr.film, routine, model, instance_number=1).pixel_array
    assert not _coloured(px[:rows]).any()  # no map for a routine call: the film stays grey

    small = build_sc(source, pr.film, routine, model, instance_number=1, max_rows=1024).pixel_array
    assert small.shape[1] == round(source.Columns * 1024 / rows) and small.shape[0] > 1024


def test_structured_report_validates_and_reads_back(analysed, tmp_path):
    source, film, pred, model = analysed
    sc = build_sc(source, film, pred, model, instance_number=1)
    sr = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1)
    path = tmp_path / "sr.dcm"
    back = saved_valid_sr(sr, path)
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.AccessionNumber == "ACC-4711"
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "COMPLETE"
    assert back.ReferencedRequestSequence[0].AccessionNumber == "ACC-4711"
    assert back.SOPClassUID == ComprehensiveSRStorage  # not Comprehensive 3D SR: no 3D coordinates
    (eq,) = _ours(back)  # the device UID is the device observer's (dciodvfy: not an SR equipment attribute)
    assert "DeviceUID" not in eq and any(model.version in v for v in eq.SoftwareVersions)
    observer = {it.ConceptNameCodeSequence[0].CodeValue: it for it in back.ContentSequence}
    assert observer["121012"].UID == model.device_uid  # Device Observer UID
    (scheme,) = back.CodingSchemeIdentificationSequence  # our private scheme is declared in the SR
    assert scheme.CodingSchemeDesignator == "99CXRNODE" and scheme.CodingSchemeResponsibleOrganization == MANUFACTURER
    (group,) = read_findings(back)
    assert group["finding"] is None  # an estimate, not a "Finding = COVID-19"
    probs = group["probabilities"]
    assert probs == pytest.approx({"COVID-19": pred.probabilities[0], "Normal": pred.probabilities[1],
                                   "Viral pneumonia": pred.probabilities[2]}, rel=5e-3)
    assert sum(probs.values()) == pytest.approx(1.0, abs=2e-3)
    # the normal class's threshold decides nothing (cxr_node.model.policy), so the SR does not show one
    assert group["thresholds"] == {"COVID-19": 0.3, "Viral pneumonia": 0.4}
    expected = {"COVID-19": pred.probabilities[0] >= 0.3, "Viral pneumonia": pred.probabilities[2] >= 0.4}
    assert group["above"] == expected
    assert group["evaluations"] == {}  # no Present/Absent for a disease the model only estimates
    assert group["priority"] == pred.priority
    assert group["source_sop_uids"] == [source.SOPInstanceUID, sc.SOPInstanceUID]
    assert group["tracking_uid"] == model.tracking_uid(source.SOPInstanceUID)


def _items(ds, path=()):
    """(path of concept meanings, item) for every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        yield path + (name,), item
        yield from _items(item, path + (name,))


def _code(item):
    c = item.ConceptNameCodeSequence[0]
    return c.CodeValue, c.CodingSchemeDesignator


def test_sr_content_tree_reads_as_a_triage_estimate(analysed, tmp_path):
    """Each point of issue 19, read from the content tree itself: probabilities with at most 3
    significant digits, each with its class, its operating point and whether it was exceeded; a
    coded urgency for the study and the film; the notice as a text item; algorithm name and
    version once per group and nothing more; a refused film's group with its coded reason;
    standard codes except where none exists, each private one listed in docs/integration.md and
    docs/conformance.md."""
    import re
    from pathlib import Path

    from cxr_node.eligibility.refusal import Refusal, RefusalCode
    from cxr_node.encode.sr import PRIORITY_CODES, PRIVATE_SCHEME, RefusedFilm, read_report, reason_code

    source, film, pred, model = analysed
    sc = build_sc(source, film, pred, model, instance_number=1)
    refused = source.copy()
    refused.SOPInstanceUID = source.SOPInstanceUID + ".9"
    why = Refusal(RefusalCode.NO_LUNG_FIELDS, "no plausible lung fields: one lung field only")
    sr = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1, refused=[RefusedFilm(refused, why)])
    path = tmp_path / "sr.dcm"
    back = saved_valid_sr(sr, path)
    items = list(_items(back))

    nums = [(p, it) for p, it in items if it.ValueType == "NUM"]
    probabilities = [(p, it) for p, it in nums if _code(it) == ("122157", "DCM")]
    thresholds = [(p, it) for p, it in nums if _code(it) == ("122411", "DCM")]
    assert len(probabilities) == 3 and len(thresholds) == 2  # none for the normal class
    for _, it in probabilities + thresholds:
        mv = it.MeasuredValueSequence[0]
        text = str(mv.NumericValue)
        assert re.fullmatch(r"\d+(\.\d+)?", text), text  # a plain decimal: never 4.04e-05
        assert len(text.replace(".", "").lstrip("0")) <= 3, text  # at most 3 significant digits
        assert mv.MeasurementUnitsCodeSequence[0].CodeValue == "%" and "FloatingPointValue" not in mv
    for _, it in probabilities:
        mods = {_code(m): m.ConceptCodeSequence[0] for m in it.ContentSequence if m.ValueType == "CODE"}
        assert mods[("246090004", "SCT")].CodingSchemeDesignator == "SCT"  # the class, a standard code
        if mods[("246090004", "SCT")].CodeMeaning != "Normal":
            assert mods[("ABOVEOP", PRIVATE_SCHEME)].CodeMeaning in ("Yes", "No")
    meanings = {m for _, it in items if it.ValueType == "CODE" for m in [it.ConceptCodeSequence[0].CodeMeaning]}
    assert not meanings & {"Present", "Absent"}

    priorities = [(p, it.ConceptCodeSequence[0]) for p, it in items if _code(it) == ("260870009", "SCT")]
    by_level = {len(p): c for p, c in priorities}
    assert by_level[2].CodeMeaning == PRIORITY_CODES[pred.priority].meaning  # the study's
    assert by_level[4].CodeMeaning == PRIORITY_CODES[pred.priority].meaning  # the film's, on its first measurement
    # the document's first text item (after the observer's name) is the call in one sentence; the notice follows
    texts = [it for _, it in items if it.ValueType == "TEXT" and _code(it) == ("121106", "DCM")]
    first_text = next(it for _, it in items if it.ValueType == "TEXT" and it.RelationshipType == "CONTAINS")
    assert first_text is texts[0] and texts[0].TextValue.startswith(pred.priority.capitalize() + ": ")
    assert "operating point 30% (not yet calibrated at this site)" in texts[0].TextValue
    assert texts[0].TextValue.endswith("1 more film was not analysed. Research triage, not a diagnosis.")
    assert "research triage, not for diagnostic use" in texts[1].TextValue.lower()
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("126000", "DCM")  # TID 1500's: pixelmed picks it
    assert title.CodeMeaning.startswith("Chest X-ray AI triage estimate")

    names = [p[-1] for p, _ in items]
    assert names.count("Algorithm Name") == 2 and names.count("Algorithm Version") == 2  # once per group
    assert "Algorithm Manufacturer" not in names
    params = [it.TextValue for p, it in items if p[-1] == "Algorithm Parameters"]
    assert params == ["operating points: the model's (operating point not yet calibrated at this site)"] * 2

    report = read_report(back)
    assert report["priority"] == pred.priority and "not for diagnostic use" in report["notice"]
    assert report["summary"] == texts[0].TextValue and report["title"] == title.CodeMeaning
    analysed_group, refused_group = report["films"]
    assert refused_group["finding"] == "Not analysed" and refused_group["probabilities"] == {}
    assert refused_group["evaluations"] == {"Reason not analysed": reason_code(why).meaning}
    assert refused_group["source_sop_uids"] == [refused.SOPInstanceUID]

    # every private code used is listed for the integration engineer and in the conformance statement
    docs = Path(__file__).resolve().parents[2] / "docs"
    private = {c.CodeValue for _, it in items for key in ("ConceptNameCodeSequence", "ConceptCodeSequence")
               for c in it.get(key, []) if c.CodingSchemeDesignator == PRIVATE_SCHEME}
    for doc in ("integration.md", "conformance.md"):
        text = (docs / doc).read_text()
        assert private and all(f"`{v}`" in text for v in private), (doc, private)


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


def test_heat_made_small_then_enlarged_is_the_full_resolution_heat():
    """The overlay's heat map is smoothed and masked at most overlay.HEAT_SIDE pixels wide and then
    enlarged (the full-size Gaussian was most of a Secondary Capture's cost): the map and the
    pixels it colours agree with the same map made at the film's own resolution."""
    from cxr_node.encode import overlay

    rng = np.random.default_rng(7)
    cam = rng.random((8, 8)).astype(np.float32)
    yy, xx = np.mgrid[0:256, 0:240]
    mask = (((yy - 128) / 100.0) ** 2 + ((xx - 70) / 45.0) ** 2 < 1) | (((yy - 128) / 100.0) ** 2
                                                                           + ((xx - 170) / 45.0) ** 2 < 1)
    shape, box = (1955, 1841), (0.1, 0.9, 0.05, 0.95)
    small = overlay.heat(shape, cam, box, mask)
    full = overlay.heat(shape, cam, box, mask, work_side=4096)
    assert small.shape == full.shape == shape
    assert float(np.abs(small - full).max()) < 0.03
    film = rng.random(shape).astype(np.float32) * 0.2 + 0.4
    a = overlay.render_overlay(film, cam, box=box, lung_mask=mask, top_fraction=overlay.TOP_FRACTION)
    coloured = (a[..., 0] != a[..., 1]) | (a[..., 1] != a[..., 2])
    assert 0.02 < coloured.mean() < 0.2  # the strongest part of the lungs, not all of them
    grey = np.rint(film * 255).astype(np.uint8)
    assert np.array_equal(a[~coloured][:, 0], grey[~coloured])  # the film itself is untouched elsewhere
