"""The start-up warm-up (cxr_node.study.warmup) takes its synthetic film through every stage; if
a stage's interface moves on, the warm-up must say so rather than quietly warming nothing."""

from __future__ import annotations

import logging

import numpy as np

from cxr_node.study.warmup import synthetic_film, warm_up


def test_synthetic_film_reaches_the_secondary_capture_without_a_warning(caplog):
    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.model.infer import Predictor
    from cxr_node.model.lungs import LungSegmenter

    ds = synthetic_film()
    assert ds.pixel_array.shape == (320, 288) and int(np.ptp(ds.pixel_array)) > 1000
    predictor = Predictor(BUNDLED_CHECKPOINT, device="cpu")
    segmenter = LungSegmenter(None, device=predictor.device)
    with caplog.at_level(logging.DEBUG, logger="cxr_node.study.warmup"):
        warm_up(predictor, segmenter, ModelIdentity.from_meta(predictor.meta), 2048)
    assert not [r for r in caplog.records if r.name == "cxr_node.study.warmup"], caplog.text
