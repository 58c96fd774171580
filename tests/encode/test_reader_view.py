"""What a reader sees from a model with an abnormality output (the v5 kind, a tiny random checkpoint):
the SR's call in one sentence, its first finding the abnormality estimate with its operating point and
whose it is, the patterns after it; the SC's headline; dcmtk's dsr2html rendering the SR. And the
wording itself (percentages, sentences) as pure functions."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import numpy as np
import pytest
from conftest import require_tool
from helpers_model import make_checkpoint
from pydicom import dcmread
from validators import saved_valid_sr

from cxr_node.encode import wording
from cxr_node.encode.identity import ModelIdentity
from cxr_node.encode.overlay import legend_lines
from cxr_node.encode.sc import build_sc
from cxr_node.encode.sr import AnalysedFilm, build_sr, read_report
from cxr_node.model.policy import Decision, Finding

THRESHOLDS = {"COVID": 0.3, "Normal": 0.5, "Viral Pneumonia": 0.4}


def test_percentages_never_use_exponents():
    assert [wording.percent(p) for p in (0.8712, 0.4, 0.00168, 4.0377e-05, 0.99996, 0.001, 1.0)] == \
        ["87.1%", "40%", "0.168%", "< 0.1%", "100%", "0.1%", "100%"]
    assert [wording.percent(p, 2) for p in (0.8712, 0.406, 0.0123)] == ["87%", "41%", "1.2%"]
    assert [wording.percent_value(p) for p in (0.8712, 4.0377e-05, 1e-13, 0.3)] == ["87.1", "0.00404", "0", "30"]


def _call(priority="urgent", abnormal=0.87, threshold=0.4, calibration="model", probs=(0.5, 0.2, 0.3)):
    model = ModelIdentity("m", "v5", "densenet121", "0" * 64, ("COVID", "Normal", "Viral Pneumonia"),
                          dict(THRESHOLDS), calibration=calibration, abnormal_threshold=threshold)
    pred = type("P", (), {"labels": model.labels, "probabilities": probs, "abnormal": abnormal, "priority": priority,
                          "top_label": "COVID"})()
    return wording.call_for(pred, model), model, pred


def test_the_call_in_one_sentence_and_as_a_headline():
    site, _, _ = _call(calibration="site CR1 v2")
    assert wording.summary([site]) == ("Urgent: abnormal chest radiograph 87%, above the site's operating point 40%. "
                                       "Research triage, not a diagnosis.")
    assert wording.headline(site) == "URGENT: abnormal 87% (operating point 40%); pattern most like COVID-19"
    model, m, pred = _call(priority="routine", abnormal=0.12)
    assert wording.summary([model], refused=2) == (
        "Routine: abnormal chest radiograph 12%, below the model's operating point 40% (not yet calibrated at this "
        "site). 2 more films were not analysed. Research triage, not a diagnosis.")
    assert wording.headline(model) == "ROUTINE: abnormal 12% (operating point 40%)"
    assert wording.top_finding(pred, m) == ("abnormal", pytest.approx(0.12))
    assert "not yet calibrated at this site" in wording.algorithm_parameter(m)
    # a pattern the site named raised the flag although p(abnormal) is below its operating point
    trig, m, pred = _call(abnormal=0.2)
    m = dataclasses.replace(m, pattern_triggers=("COVID",))
    c = wording.call_for(pred, m)
    assert wording.headline(c) == "URGENT: COVID-19 pattern 50% (operating point 30%)"
    assert wording.top_finding(pred, m) == ("COVID", 0.5)
    # several films: the most urgent speaks
    assert "the most urgent of 2 films" in wording.summary([model, site])
    assert wording.summary([], refused=1).startswith("Not analysed: 1 film sent, none could be analysed")


@pytest.fixture(scope="module")
def v5(tmp_path_factory, films):
    from cxr_node.model.infer import Predictor
    from cxr_node.model.preprocess import prepare

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt5") / "v5.pt", input_size=64, thresholds=THRESHOLDS,
                           abnormal_threshold=0.4)
    predictor = Predictor(ckpt, device="cpu")
    source = dcmread(films["RG1_UNCR"])
    x, _ = predictor.preprocess_with_display(source)
    (pred,) = predictor.predict([x], explain=True)
    assert pred.abnormal is not None  # the v5 kind: p(abnormal) beside the patterns
    model = ModelIdentity.from_meta(predictor.meta)
    assert model.abnormal_threshold == 0.4
    film = prepare(source, predictor.params, None).film
    return source, film, predictor.policy.apply(pred), model


def test_v5_sr_first_finding_is_the_abnormality_estimate(v5, tmp_path):
    source, film, pred, model = v5
    sc = build_sc(source, film, pred, model, instance_number=1)
    sr = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1)
    path = tmp_path / "sr.dcm"
    back = saved_valid_sr(sr, path)
    report = read_report(back)  # read back through highdicom
    above = pred.abnormal >= 0.4
    assert report["summary"] == (f"{pred.priority.capitalize()}: abnormal chest radiograph "
                                 f"{wording.percent(pred.abnormal, 2)}, {'above' if above else 'below'} the model's "
                                 "operating point 40% (not yet calibrated at this site). Research triage, not a "
                                 "diagnosis.")
    (g,) = report["films"]
    assert g["abnormal"] == pytest.approx(pred.abnormal, rel=5e-3) and g["abnormal_threshold"] == 0.4
    assert g["priority"] == pred.priority
    assert set(g["patterns"]) == {"COVID-19", "Normal", "Viral pneumonia"}  # every class named as a pattern
    assert g["thresholds"] == {} and g["above"] == {}  # no pattern may raise the flag here: no operating points
    group = next(it for it in back.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "126010")
    items = group.ContentSequence[0].ContentSequence
    nums = [it for it in items if it.ValueType == "NUM"]
    first = {m.ConceptNameCodeSequence[0].CodeValue: m for m in nums[0].ContentSequence}
    assert first["246090004"].ConceptCodeSequence[0].CodeValue == "263654008"  # SCT "Abnormal"
    assert first["ABOVEOP"].ConceptCodeSequence[0].CodeMeaning == ("Yes" if above else "No")
    assert nums[1].ConceptNameCodeSequence[0].CodeMeaning == "Threshold Value"
    assert nums[1].MeasuredValueSequence[0].NumericValue == 40
    (param,) = [it.TextValue for it in items if it.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
    assert param == "operating point on p(abnormal) 40%: the model's (operating point not yet calibrated at this site)"

    # a station with its own calibration: the site's operating point, named in the parameters
    site = dataclasses.replace(model, calibration="site CR1 v3")
    r = read_report(build_sr([AnalysedFilm(source, sc, pred)], site, study_version=1))
    assert "the site's operating point 40%." in r["summary"] and "not yet calibrated" not in r["summary"]


def test_v5_sc_headline(v5):
    source, film, pred, model = v5
    urgent = Finding(pred.prediction, Decision(True, "urgent", ("abnormal",)))
    call = wording.call_for(urgent, model)
    lines = [t for t, _ in legend_lines(urgent, model.name, model.version, call=call)]
    like = wording.display(max((p, n) for n, p in zip(pred.labels, pred.probabilities) if n != "Normal")[1])
    assert lines[1] == f"URGENT: abnormal {wording.percent(pred.abnormal, 2)} (operating point 40%); pattern most like {like}"
    assert lines[2] == "operating point not yet calibrated at this site"
    assert lines[3].startswith("patterns: COVID-19 ")

    def yellow_rows(m):
        px = build_sc(source, film, urgent, m, instance_number=1).pixel_array
        strip = px[source.Rows:]
        y = (strip[..., 0] > 200) & (strip[..., 1] > 150) & (strip[..., 2] < 80)
        return np.flatnonzero(y.any(axis=1)).size

    # the burned-in legend has the yellow "not yet calibrated" line only without a site calibration
    assert yellow_rows(model) > 1.6 * yellow_rows(dataclasses.replace(model, calibration="site CR1 v3"))


def test_dsr2html_renders_the_sr(v5, tmp_path):
    """dcmtk's renderer (what many viewers do): the readable title, the sentence first, each value with its
    name and in percent, no exponent anywhere."""
    exe = require_tool("dsr2html", "dcmtk")
    source, film, pred, model = v5
    sc = build_sc(source, film, pred, model, instance_number=1)
    sr = build_sr([AnalysedFilm(source, sc, pred)], model, study_version=1)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", out)).replace("&#39;", "'")
    assert "Comprehensive SR Document" in text and "Chest X-ray AI triage estimate" in text
    summary = read_report(sr)["summary"]
    assert summary in text
    assert text.index(summary) < text.index("Measurement Group") < text.index("Probability:")
    assert f"Probability: {wording.percent_value(pred.abnormal)} %" in text
    assert not re.search(r"\d[eE][-+]\d", text)


def test_algorithm_parameter_names_whose_operating_point():
    _, m, _ = _call()
    assert wording.algorithm_parameter(m) == ("operating point on p(abnormal) 40%: the model's (operating point "
                                              "not yet calibrated at this site)")
    site = dataclasses.replace(m, calibration="site CR1 v3", temperature=1.25)
    assert wording.algorithm_parameter(site) == "operating point on p(abnormal) 40%: calibration site CR1 v3 temperature 1.2500"
    v2 = dataclasses.replace(site, abnormal_threshold=None)
    assert wording.algorithm_parameter(v2) == "calibration site CR1 v3 temperature 1.2500"  # as SRs said it since v2
