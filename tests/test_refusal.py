"""Refusals are codes end to end (issue 21): the rule that refuses makes the code, and the SR, drift,
Prometheus and ``status`` read the code, never the words. Rewording a reason changes no code."""

from __future__ import annotations

import pickle

import pytest
from pydicom import dcmread

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import ImageResult, utcnow
from cxr_node.db.session import Database
from cxr_node.eligibility import rules
from cxr_node.eligibility.refusal import Refusal, RefusalCode
from cxr_node.encode.identity import ModelIdentity
from cxr_node.encode.sr import REASON_CODES, RefusedFilm, build_sr
from cxr_node.model.checkpoint import read_checkpoint
from cxr_node.onboarding import drift
from cxr_node.ops import status
from helpers_model import make_checkpoint


def test_a_refusal_is_its_text_and_carries_its_code():
    r = Refusal(RefusalCode.HEADER, "ViewPosition is LL: only frontal (PA/AP) films are analysed")
    assert "LL" in r and r.text.startswith("ViewPosition") and r.code is RefusalCode.HEADER
    assert pickle.loads(pickle.dumps(r)).code is RefusalCode.HEADER
    assert RefusalCode.of("no_such_code") is RefusalCode.OTHER and RefusalCode.of(None) is RefusalCode.OTHER
    with pytest.raises(TypeError):
        Refusal("header", "a plain string is not a code")
    with pytest.raises(ValueError):
        Refusal(RefusalCode.HEADER, "")


def test_each_rule_makes_its_code():
    assert rules.sop_class_reason("1.2.840.10008.5.1.4.1.1.2").code is RefusalCode.SOP_CLASS  # CT
    assert rules.header_reason({"BodyPartExamined": "KNEE"}).code is RefusalCode.NOT_CHEST
    assert rules.header_reason({"BodyPartExamined": "CHEST", "ViewPosition": "LL"}).code is RefusalCode.HEADER
    assert rules.chest_by_header(rules.header_reason({"ViewPosition": "LL"}))
    assert not rules.chest_by_header(rules.header_reason({"BodyPartExamined": "KNEE"}))
    assert rules.ood_reason(9.0, 5.0).code is RefusalCode.OUT_OF_DOMAIN
    assert rules.ood_reason(4.0, 5.0) is None
    assert rules.unusable_pixels("DICOM image is blank").code is RefusalCode.PIXELS


def _sr_reason(ds) -> str:
    """The coded reason of the SR's (one) not-analysed group."""
    def walk(items):
        for it in items:
            if "ConceptCodeSequence" in it and it.ValueType == "CODE":
                yield it.ConceptNameCodeSequence[0].CodeValue, it.ConceptCodeSequence[0].CodeValue
            yield from walk(it.get("ContentSequence", []))
    from cxr_node.encode.sr import REASON_NOT_ANALYSED
    return dict(walk(ds.ContentSequence))[REASON_NOT_ANALYSED.value]


def test_rewording_a_reason_changes_nothing_a_machine_reads(monkeypatch, tmp_path, films):
    before = rules.ood_reason(9.0, 5.0)
    monkeypatch.setattr(rules, "OUTSIDE_DISTRIBUTION", "unlike any film this model was taught on")
    after = rules.ood_reason(9.0, 5.0)
    assert before.text != after.text and "unlike any film" in after
    assert after.code is before.code is RefusalCode.OUT_OF_DOMAIN

    # the SR's coded reason
    ck = read_checkpoint(make_checkpoint(tmp_path / "m.pt", input_size=64))
    model = ModelIdentity.from_meta({**ck["meta"], "weights_sha256": ck["sha256"]})
    source = dcmread(films["RG1_UNCR"], stop_before_pixels=True)
    codes = {_sr_reason(build_sr([], model, study_version=1, refused=[RefusedFilm(source, r)])) for r in (before, after)}
    assert codes == {REASON_CODES[RefusalCode.OUT_OF_DOMAIN].value}

    # status and drift read the stored code
    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    with db.transaction() as s:
        for n, r in enumerate((before, after, Refusal(RefusalCode.HEADER, "lateral, in new words"))):
            s.add(ImageResult(study_uid="1.2.3", study_version=1, sop_instance_uid=f"1.2.3.{n}", analysed=False,
                              reason=r.text, refusal_code=r.code.value, created_at=utcnow()))
    assert status.collect(settings, db)["films_not_analysed"] == {"out_of_domain": 2, "header": 1}
    with db.session() as s:
        rows = list(s.query(ImageResult).order_by(ImageResult.sop_instance_uid))
        assert [drift.film_features(r, ["COVID"])["refused"] for r in rows] == [1.0, 1.0, None]
    db.dispose()
