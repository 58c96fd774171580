"""Checkpoints (hash, metadata, tampering), the network factory, the Predictor and the triage policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cxr_node.errors import CheckpointError
from cxr_node.model.checkpoint import (GRADCAM_LAYERS, build_model, load_checkpoint, read_checkpoint, save_checkpoint,
                            state_dict_sha256)
from cxr_node.model.policy import TriagePolicy
from helpers_model import LABELS, make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model.pt", input_size=64)


def test_roundtrip_verifies_and_predicts_identically(ckpt):
    raw = read_checkpoint(ckpt)
    assert raw["sha256"] == state_dict_sha256(raw["state_dict"])
    model, meta = load_checkpoint(ckpt)
    assert meta["labels"] == LABELS and meta["weights_sha256"] == raw["sha256"]
    ref = build_model("densenet121", 3)
    ref.load_state_dict(raw["state_dict"])
    ref.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # weights_only load works on the raw file: metadata are plain types
    plain = torch.load(ckpt, weights_only=True)
    assert isinstance(plain["meta"]["preprocess"], dict)


def test_tampered_weights_are_refused(ckpt, tmp_path):
    raw = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point() and v.numel() > 10)
    raw["state_dict"][key].view(-1)[3] += 1e-3
    bad = tmp_path / "tampered.pt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(bad)


def test_truncated_or_foreign_files_are_refused(ckpt, tmp_path):
    data = ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a cxr-node checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_missing_metadata_and_label_mismatch_are_refused(ckpt, tmp_path):
    raw = torch.load(ckpt, weights_only=True)
    no_temp = dict(raw, meta={k: v for k, v in raw["meta"].items() if k != "temperature"})
    torch.save(no_temp, tmp_path / "nometa.pt")
    with pytest.raises(CheckpointError, match="lacks temperature"):
        load_checkpoint(tmp_path / "nometa.pt")
    four = dict(raw, meta=dict(raw["meta"], labels=LABELS + ["Lung Opacity"]))
    torch.save(four, tmp_path / "four.pt")
    with pytest.raises(CheckpointError, match="output layer has 3 units but metadata names 4 labels"):
        load_checkpoint(tmp_path / "four.pt")
    with pytest.raises(CheckpointError, match="metadata lacks"):
        save_checkpoint(tmp_path / "x.pt", build_model("densenet121", 3), {"labels": LABELS})


def test_fp16_checkpoint_is_smaller_and_close(ckpt, tmp_path):
    raw = read_checkpoint(ckpt)
    half = save_checkpoint(tmp_path / "half.pt", raw["state_dict"], raw["meta"], fp16=True)
    r16 = read_checkpoint(half)
    assert r16["meta"]["weights_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in r16["state_dict"].values() if v.is_floating_point())
    assert half.stat().st_size < 0.6 * ckpt.stat().st_size
    m32, _ = load_checkpoint(ckpt)
    m16, _ = load_checkpoint(half)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        p32, p16 = torch.softmax(m32(x), 1), torch.softmax(m16(x), 1)
    assert float((p32 - p16).abs().max()) < 5e-3


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet-b0"])
def test_other_archs_build_and_explain(arch, tmp_path):
    from cxr_node.model.infer import Predictor

    p = make_checkpoint(tmp_path / f"{arch}.pt", input_size=64, arch=arch)
    pred = Predictor(p)
    assert pred.target_layer == GRADCAM_LAYERS[arch]
    [r] = pred.predict(torch.randn(1, 1, 64, 64))
    assert len(r.probabilities) == 3 and abs(sum(r.probabilities) - 1) < 1e-6
    assert r.cam is not None and r.cam.shape == (64, 64)


def test_predictor_temperature_threshold_and_frozen_records(tmp_path):
    from cxr_node.model.infer import Predictor

    p = make_checkpoint(tmp_path / "t.pt", input_size=64, temperature=2.5, thresholds={"COVID": 0.2})
    pred = Predictor(p)
    x = torch.randn(4, 1, 64, 64)
    res = pred.predict(x)
    logits = pred.logits(x).numpy().astype(np.float64) / 2.5
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for r, e in zip(res, expected):
        np.testing.assert_allclose(r.probabilities, e, atol=1e-5)
        assert r.top_label == LABELS[int(np.argmax(e))]
        assert not hasattr(r, "urgent")  # a Prediction holds only what the model said
        f = pred.policy.apply(r)
        assert f.urgent == (e[0] >= 0.2) and f.top_label == r.top_label and f.as_dict()["urgent"] == f.urgent
        assert r.model_version == "test-densenet121-64" and r.cam_label == r.top_label
        assert r.cam.shape == (64, 64) and 0.0 <= r.cam.min() and r.cam.max() <= 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        res[0].top_label = "Normal"
    with pytest.raises(ValueError):
        res[0].cam[0, 0] = 1.0  # read-only map
    # batched Grad-CAM equals one-at-a-time Grad-CAM (grouping by class must not mix classes)
    single = [pred.predict(x[i:i + 1])[0] for i in range(4)]
    for a, b in zip(res, single):
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-4)
    with pytest.raises(ValueError, match="preprocessed tensors"):
        pred.predict(torch.randn(1, 1, 32, 32))


def test_triage_policy():
    pol = TriagePolicy(labels=tuple(LABELS), thresholds={"COVID": 0.3, "Viral Pneumonia": 0.6},
                       critical_labels=("COVID",), normal_label="Normal")
    assert pol.decide([0.31, 0.69, 0.0]).priority == "urgent"
    d = pol.decide([0.29, 0.71, 0.0])
    assert (d.urgent, d.priority) == (False, "routine")
    assert pol.decide([0.1, 0.2, 0.7]).priority == "review"
    assert pol.decide([0.1, 0.45, 0.45]).priority == "routine"
    with pytest.raises(ValueError, match="no operating threshold"):
        TriagePolicy(labels=tuple(LABELS), thresholds={}, critical_labels=("COVID",))
    with pytest.raises(ValueError, match="expected 3 probabilities"):
        pol.decide([0.5, 0.5])


def test_bundled_model_is_the_default_and_the_one_its_card_and_results_describe(tmp_path):
    """The shipped checkpoint verifies, the default config points at it, and its recorded test
    metrics, temperature and thresholds are those in training/results and its model card."""
    import json
    from pathlib import Path

    from cxr_node.config import BUNDLED_CHECKPOINT, parse

    assert parse({}, tmp_path).model.checkpoint == BUNDLED_CHECKPOINT
    ck = read_checkpoint(BUNDLED_CHECKPOINT)  # sha256 and metadata verified
    meta = ck["meta"]
    card = (BUNDLED_CHECKPOINT.parent / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert meta["version"] in card.splitlines()[0]
    results = Path(__file__).resolve().parents[1] / "training" / "results" / "densenet121-128-v2"
    test = json.loads((results / "test" / "metrics.json").read_text())
    cal = json.loads((results / "calibration.json").read_text())
    assert test["weights_sha256"] == ck["sha256"] and test["split"] == "test"
    assert meta["metrics"]["test"]["macro_auc"] == pytest.approx(test["macro_auc"])
    assert meta["temperature"] == pytest.approx(cal["temperature"])
    assert meta["thresholds"] == pytest.approx({k: v["threshold"] for k, v in cal["operating_points"].items()})
    assert f"{test['macro_auc']:.3f}" in card and f"{test['per_class']['COVID']['sensitivity']:.3f}" in card
