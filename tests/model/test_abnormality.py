"""The abnormality output (v5): the head's tensors travel in the state_dict (so the sha256 covers
them), p(abnormal) is the head on the film's pooled features, and the policy's urgent flag is
p(abnormal) against its operating point, with patterns raising it only when named as triggers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_node.errors import CheckpointError
from cxr_node.model.abnormality import AbnormalityHead
from cxr_node.model.checkpoint import read_verified, save_checkpoint
from cxr_node.model.infer import Predictor
from cxr_node.model.policy import TriagePolicy
from tests.helpers_model import make_checkpoint


@pytest.fixture(scope="module")
def v5(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("v5") / "v5.pt", abnormal_threshold=0.5)


def test_p_abnormal_is_the_head_on_the_pooled_features(v5):
    pr = Predictor(v5)
    assert pr.abnormality is not None and pr.policy.has_abnormality and pr.policy.critical_labels == ()
    x = torch.rand(3, 1, 64, 64)
    preds = pr.predict(x, explain=False)
    f = pr.features(list(x))
    want = pr.abnormality.probability(f)
    got = np.array([p.abnormal for p in preds])
    assert np.allclose(got, want, atol=1e-5) and ((got > 0) & (got < 1)).all()
    assert preds[0].as_dict()["abnormal"] == pytest.approx(want[0], abs=1e-5)


def test_head_is_covered_by_the_weights_hash(v5, tmp_path):
    ck = read_verified(v5)
    assert any(k.startswith("abnormality.") for k in ck["state_dict"])
    plain = make_checkpoint(tmp_path / "v2.pt")  # same seed, same network weights, no head
    assert read_verified(plain)["sha256"] != ck["sha256"]
    ck["state_dict"]["abnormality.bias"] = ck["state_dict"]["abnormality.bias"] + 1
    torch.save(ck, tmp_path / "altered.pt")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        Predictor(tmp_path / "altered.pt")


def test_checkpoint_with_tensors_but_no_metadata_is_refused(v5, tmp_path):
    ck = read_verified(v5)
    meta = dict(ck["meta"])
    meta.pop("abnormality")
    save_checkpoint(tmp_path / "bad.pt", ck["state_dict"], meta)
    with pytest.raises(CheckpointError, match="abnormality tensors without"):
        Predictor(tmp_path / "bad.pt")


def test_policy_urgent_by_abnormal_and_by_named_patterns_only():
    labels = ("COVID", "Normal", "Viral Pneumonia")
    pol = TriagePolicy(labels=labels, thresholds={"COVID": 0.3, "Viral Pneumonia": 0.2}, normal_label="Normal",
                       abnormal_threshold=0.4)
    covidish = (0.9, 0.05, 0.05)
    assert pol.decide(covidish, abnormal=0.2).priority == "routine"   # a pattern alone raises nothing
    d = pol.decide((0.1, 0.8, 0.1), abnormal=0.41)
    assert d.urgent and d.reasons == ("abnormal 0.410 >= operating point 0.400",)
    trig = TriagePolicy(labels=labels, thresholds={"COVID": 0.3}, normal_label="Normal", abnormal_threshold=0.4,
                        pattern_triggers=("COVID",))
    assert trig.decide(covidish, abnormal=0.2).reasons == ("pattern COVID 0.900 >= threshold 0.300",)
    with pytest.raises(ValueError, match="need an abnormality output"):
        TriagePolicy(labels=labels, thresholds={"COVID": 0.3}, pattern_triggers=("COVID",))
    with pytest.raises(ValueError, match="not a pattern"):
        TriagePolicy(labels=labels, thresholds={"Normal": 0.3}, normal_label="Normal", abnormal_threshold=0.4,
                     pattern_triggers=("Normal",))
    with pytest.raises(ValueError, match="has none"):
        pol.decide(covidish)


def test_head_round_trips_through_meta_and_tensors():
    from cxr_node.model.adaptation import LogisticHead

    rng = np.random.default_rng(0)
    h = AbnormalityHead(LogisticHead(("Normal", "Abnormal"), rng.normal(size=4), np.ones(4), rng.normal(size=(2, 4)),
                                     np.zeros(2), 10.0), ("class_layers.flatten",), 0.25, "rule")
    back = AbnormalityHead.from_checkpoint(h.state_tensors(), {"abnormality": h.meta()})
    x = rng.normal(size=(5, 4))
    assert np.allclose(back.probability(x), h.probability(x), atol=1e-6) and back.threshold == 0.25


def test_bundled_v5_loads_with_its_head_and_gate_and_is_not_the_default(tmp_path):
    """The v5 checkpoint ships beside v2 (training/results/v5: it did not pass the ship rule), selectable as
    [model] checkpoint = "bundled:v5"; its gate is bound to its own weights."""
    from cxr_node.config import BUNDLED_CHECKPOINT, BUNDLED_MODELS, parse

    pr = Predictor(BUNDLED_MODELS["v5"])
    assert pr.abnormality is not None and pr.ood is not None
    assert pr.meta["based_on"]["version"] == "densenet121-128-covid19radiography-v2"
    assert pr.policy.abnormal_threshold == pytest.approx(pr.meta["abnormality"]["threshold"])
    assert BUNDLED_CHECKPOINT == BUNDLED_MODELS["v2"]
    assert parse({"model": {"checkpoint": "bundled:v5"}}, tmp_path).model.checkpoint == BUNDLED_MODELS["v5"]
    with pytest.raises(Exception, match="no bundled model 'v9'"):
        parse({"model": {"checkpoint": "bundled:v9"}}, tmp_path)
