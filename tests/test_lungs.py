"""The lung-field segmenter, the lung crop and the pixel eligibility rules (bundled checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_node.eligibility import rules as eligibility
from cxr_node.errors import CheckpointError
from cxr_node.model.lungs import DEFAULT_CHECKPOINT, LungSegmenter, analyse_mask, read_segmenter_checkpoint
from cxr_node.model.checkpoint import atomic_torch_save, make_checkpoint, read_checkpoint
from cxr_node.model.preprocess import DEFAULT_PARAMS, base_transform, display_and_contrast, prepare


@pytest.fixture(scope="module")
def seg() -> LungSegmenter:
    return LungSegmenter()


def _contrast(src):
    return display_and_contrast(src, DEFAULT_PARAMS)[1]


def test_bundled_segmenter_is_verified_and_described():
    ck = read_segmenter_checkpoint(DEFAULT_CHECKPOINT)
    meta = ck["meta"]
    assert meta["kind"] == "lung-segmenter" and meta["metrics"]["val_dice"] >= 0.9
    assert DEFAULT_CHECKPOINT.stat().st_size < 2_000_000
    with pytest.raises(CheckpointError, match="not a classifier"):
        read_checkpoint(DEFAULT_CHECKPOINT)  # the classifier loader refuses a segmenter


def test_altered_segmenter_weights_are_refused(tmp_path):
    ck = read_segmenter_checkpoint(DEFAULT_CHECKPOINT)
    key = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][key] = ck["state_dict"][key] + 1
    atomic_torch_save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        LungSegmenter(tmp_path / "bad.pt")
    wrong = make_checkpoint(read_segmenter_checkpoint(DEFAULT_CHECKPOINT)["state_dict"],
                            {**ck["meta"], "kind": "something-else"})
    atomic_torch_save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="not a lung-segmenter"):
        LungSegmenter(tmp_path / "wrong.pt")


def test_lungs_found_on_a_real_chest_film(seg, films):
    lungs = seg.analyse(_contrast(films["RG1_UNCR"]))
    assert lungs.plausible, lungs.reason
    left, right = lungs.sides
    assert left > 0.08 and right > 0.08
    y0, y1, x0, x1 = lungs.box
    assert x0 < 0.3 and x1 > 0.7 and y1 - y0 > 0.4


def _patterns(size=320):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:size, 0:size] / size
    from skimage import data
    yield "noise", rng.random((size, size)).astype(np.float32)
    yield "stripes", ((np.sin(xx * 40) + 1) / 2).astype(np.float32)
    yield "checkerboard", (data.checkerboard().astype(np.float32) / 255)
    yield "rings", ((np.sin(((xx - .5) ** 2 + (yy - .5) ** 2) * 200) + 1) / 2).astype(np.float32)
    yield "text page", (data.page().astype(np.float32) / 255)
    yield "flat with a square", np.pad(np.ones((100, 100), np.float32), 110)


@pytest.mark.parametrize("name,img", list(_patterns()), ids=[n for n, _ in _patterns()])
def test_no_lungs_on_generated_patterns(seg, name, img):
    from skimage.exposure import equalize_adapthist

    lungs = seg.analyse(equalize_adapthist(img, clip_limit=0.01).astype(np.float32))
    assert not lungs.plausible
    assert eligibility.lung_reason(lungs)


def test_plausibility_rules_name_what_is_wrong():
    prob = np.zeros((64, 64), np.float32)
    assert analyse_mask(prob).reason == "no lung fields found"
    prob[10:50, 8:28] = 0.9          # one lung only
    assert "one lung field only" in analyse_mask(prob).reason
    prob[10:50, 36:56] = 0.9         # and its partner, side by side with a gap between them
    assert analyse_mask(prob).reason is None
    lateral_like = np.zeros((64, 64), np.float32)
    lateral_like[5:30, 4:31] = 0.9   # two fields at different heights, touching: not a frontal view
    lateral_like[28:60, 33:60] = 0.9
    assert "not side by side" in analyse_mask(lateral_like).reason
    prob[:] = 0.9                    # everything is "lung"
    assert analyse_mask(prob).reason is not None


def test_lung_crop_is_one_code_path_for_training_and_serving(seg, films):
    sha = seg.weights_sha256
    params = {**DEFAULT_PARAMS, "input_size": 96, "lung_crop": {"margin": 0.1, "segmenter_sha256": sha}}
    served = prepare(films["RG1_UNCR"], params, seg)
    assert served.box is not None and served.lungs.plausible
    y0, y1, x0, x1 = served.box
    assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 and (y1 - y0) * (x1 - x0) < 0.9  # something was cut
    cached = base_transform(params)(films["RG1_UNCR"])          # what training caches
    whole = base_transform({**params, "lung_crop": None})(films["RG1_UNCR"])
    z = (cached - cached.mean()) / (cached.std() + 1e-6)
    np.testing.assert_allclose(served.x.numpy(), z, atol=1e-4)
    assert not np.allclose(cached, whole, atol=0.05)


def test_a_classifier_trained_with_other_segmenter_weights_is_refused(films):
    params = {**DEFAULT_PARAMS, "lung_crop": {"margin": 0.1, "segmenter_sha256": "0" * 64}}
    with pytest.raises(CheckpointError, match="trained with lung segmenter"):
        prepare(films["RG1_UNCR"], params)
    with pytest.raises(RuntimeError) as e:  # MONAI's Compose wraps it; the cause is kept
        base_transform(params)(films["RG1_UNCR"])
    assert isinstance(e.value.__cause__, CheckpointError)


def test_header_rules_accept_thorax_and_refuse_other_body_parts():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.BodyPartExamined, ds.ViewPosition = "THORAX", "PA"
    assert eligibility.header_reason(ds) is None
    ds.BodyPartExamined = "EXTREMITY"
    assert "EXTREMITY" in eligibility.header_reason(ds)
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "LL"
    assert "LL" in eligibility.header_reason(ds)
    assert eligibility.header_reason(ds, views=("PA", "LL")) is None


def test_bundled_out_of_domain_reference_is_bound_to_the_classifier_and_separates(seg, films, tmp_path):
    """The bundled classifier's reference verifies, names its classifier's weights, scores a real
    chest film inside and generated noise far outside its threshold; bound to other weights it is refused."""
    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.infer import OodReference, Predictor, default_ood_path

    pred = Predictor(BUNDLED_CHECKPOINT)
    assert pred.ood is not None and pred.ood.meta["classifier_sha256"] == pred.weights_sha256
    chest = prepare(films["RG1_UNCR"], pred.params, seg)
    noise = np.random.default_rng(0).random((1, 128, 128)).astype(np.float32)
    noise = (noise - noise.mean()) / noise.std()
    a, b = pred.predict([chest.x, noise], explain=False)
    assert a.ood_score < pred.ood.threshold < b.ood_score
    assert eligibility.ood_reason(b.ood_score, pred.ood.threshold).startswith("outside the training distribution")
    with pytest.raises(CheckpointError, match="fitted for classifier"):
        OodReference(default_ood_path(BUNDLED_CHECKPOINT), classifier_sha256="f" * 64)


def test_shared_segmenter_is_built_once_when_threads_ask_together(monkeypatch):
    """The preload thread and a worker can ask for the segmenter at the same moment: one instance."""
    import threading
    import time

    from cxr_node.model import lungs

    built = []

    class Slow:
        version = "slow"

        def __init__(self, key):
            time.sleep(0.2)  # a load long enough for the other threads to arrive
            built.append(key)

    monkeypatch.setattr(lungs, "LungSegmenter", Slow)
    monkeypatch.setattr(lungs, "_shared", {})
    got, barrier = [], threading.Barrier(4)

    def ask():
        barrier.wait()
        got.append(lungs.shared_segmenter("/nonexistent/lung.pt"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(built) == 1 and len(got) == 4 and all(g is got[0] for g in got)
