"""Lung fields: a small MONAI UNet that finds the two lungs on a frontal chest film.

Used twice, through one code path for training and serving:

* **eligibility** (:mod:`cxr_node.eligibility.rules`): a film without two plausible lung fields (area,
  one on each side, position) is not a frontal human chest film and is refused with the reason;
* **preprocessing** (:mod:`cxr_node.model.preprocess`): the classifier's input is cropped to the lungs'
  bounding box with a margin, so borders, text labels, markers and what lies outside the chest stop
  being evidence, and the Grad-CAM map is shown only inside the lungs.

The segmenter checkpoint is verified like the classifier's (format marker, sha256 of the weights,
metadata; :func:`cxr_node.model.read_checkpoint`) and is never downloaded. Its input is the film
after the shared LUT/CLAHE steps, resized to ``meta["input_size"]`` (square, aspect not kept),
z-scored; its output is a lung probability per pixel.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_node.config import BUNDLED_LUNG_CHECKPOINT
from cxr_node.errors import CheckpointError

log = logging.getLogger(__name__)

KIND = "lung-segmenter"
ARCH = "monai-unet-2d"
REQUIRED_META = ("kind", "arch", "channels", "strides", "num_res_units", "input_size", "threshold",
                 "plausibility", "metrics", "data_manifest_sha256", "version")
DEFAULT_CHECKPOINT = BUNDLED_LUNG_CHECKPOINT

#: Rules for "two plausible lung fields", as fractions of the segmenter's square input.
#: Bounds chosen on the segmenter's validation films (see the lung model card); a checkpoint
#: carries its own copy in ``meta["plausibility"]``, which wins.
DEFAULT_PLAUSIBILITY: dict[str, float] = {
    "min_side_area": 0.025,   # each lung at least 2.5% of the image
    "max_total_area": 0.75,   # both lungs together at most 75%
    "min_total_area": 0.08,   # and at least 8%
    "min_side_ratio": 0.2,    # smaller lung at least 20% of the larger
    "min_height": 0.25,       # each lung spans at least a quarter of the height
    "min_confidence": 0.6,    # mean probability inside the mask
    # a frontal view: the fields lie side by side (their heights overlap) with the mediastinum
    # between them; bounds at about the 0.5th percentile of 318 frontal validation films
    "min_vertical_overlap": 0.6,  # overlap of the two fields' row ranges / the taller field's height
    "min_gap": 0.02,              # columns between the fields (mediastinum) / image width
    "max_gap": 0.2,
}


def build_segmenter(channels: Sequence[int] = (8, 16, 32, 64, 128), strides: Sequence[int] = (2, 2, 2, 2),
                    num_res_units: int = 1) -> nn.Module:
    """A 1-channel-in, 1-logit-out 2-D UNet (MONAI), randomly initialised."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels), strides=tuple(strides),
                num_res_units=int(num_res_units))


def segmenter_input(img: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """A film in [0, 1] ``(H, W)`` or ``(1, H, W)`` -> the segmenter's ``(1, 1, size, size)`` z-scored input."""
    t = torch.as_tensor(np.asarray(img, dtype=np.float32))
    if t.ndim == 3:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"segmenter_input expects a 2-D film (got shape {tuple(t.shape)})")
    h, w = t.shape
    mode = "area" if (h >= size and w >= size) else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    t = F.interpolate(t[None, None], size=(size, size), mode=mode, **kw)
    return (t - t.mean()) / (t.std() + 1e-6)


@dataclass(frozen=True)
class LungFields:
    """What the segmenter found on one film. Coordinates are fractions of the film's height/width."""

    mask: np.ndarray                      # bool (S, S): the (at most two) lung components kept
    box: tuple[float, float, float, float] | None  # y0, y1, x0, x1 of both lungs; None if none found
    sides: tuple[float, float]            # area fraction of the lung on the image's left / right half
    total_area: float
    confidence: float                     # mean probability inside ``mask``
    reason: str | None                    # None: two plausible lung fields

    @property
    def plausible(self) -> bool:
        return self.reason is None

    def crop_box(self, margin: float) -> tuple[float, float, float, float] | None:
        """The lungs' box grown by ``margin`` (a fraction of its own size) on every side, clipped."""
        if self.box is None:
            return None
        y0, y1, x0, x1 = self.box
        dy, dx = (y1 - y0) * margin, (x1 - x0) * margin
        return max(0.0, y0 - dy), min(1.0, y1 + dy), max(0.0, x0 - dx), min(1.0, x1 + dx)

    def as_dict(self) -> dict[str, Any]:
        return {"box": None if self.box is None else [round(v, 4) for v in self.box],
                "sides": [round(v, 4) for v in self.sides], "total_area": round(self.total_area, 4),
                "confidence": round(self.confidence, 4), "reason": self.reason}


def analyse_mask(prob: np.ndarray, threshold: float = 0.5,
                 rules: Mapping[str, float] | None = None) -> LungFields:
    """Lung probability map ``(S, S)`` -> :class:`LungFields` with the plausibility verdict."""
    from scipy import ndimage

    r = dict(DEFAULT_PLAUSIBILITY)
    r.update(rules or {})
    s_h, s_w = prob.shape
    binary = prob >= threshold
    lab, n = ndimage.label(binary)
    empty = np.zeros_like(binary)
    if n == 0:
        return LungFields(empty, None, (0.0, 0.0), 0.0, 0.0, "no lung fields found")
    sizes = ndimage.sum_labels(binary, lab, index=np.arange(1, n + 1))
    # the largest component on each half (by centroid)
    centroids = ndimage.center_of_mass(binary, lab, index=np.arange(1, n + 1))
    best = {"left": (0.0, 0), "right": (0.0, 0)}
    for i, ((cy, cx), size) in enumerate(zip(centroids, sizes), start=1):
        side = "left" if cx < s_w / 2 else "right"
        if size > best[side][0]:
            best[side] = (float(size), i)
    keep = [i for _, i in best.values() if i]
    mask = np.isin(lab, keep)
    area = s_h * s_w
    left, right = best["left"][0] / area, best["right"][0] / area
    total = float(mask.sum()) / area
    conf = float(prob[mask].mean()) if mask.any() else 0.0
    ys, xs = np.nonzero(mask)
    box = (ys.min() / s_h, (ys.max() + 1) / s_h, xs.min() / s_w, (xs.max() + 1) / s_w)

    reason = None
    small = min(left, right)
    if small < r["min_side_area"]:
        reason = (f"no lung fields found (one lung field on each side needed; found "
                  f"{left:.0%} left, {right:.0%} right of the image)") if total < r["min_total_area"] else \
            f"one lung field only ({left:.0%} left, {right:.0%} right of the image)"
    elif total < r["min_total_area"] or total > r["max_total_area"]:
        reason = f"implausible lung area ({total:.0%} of the image)"
    elif small / max(left, right) < r["min_side_ratio"]:
        reason = f"lung fields of very unequal size ({left:.0%} left, {right:.0%} right)"
    else:
        for side, (_, i) in best.items():
            rows = np.nonzero((lab == i).any(axis=1))[0]
            if (rows.max() + 1 - rows.min()) / s_h < r["min_height"]:
                reason = f"implausible lung shape ({side} field spans {(rows.max() + 1 - rows.min()) / s_h:.0%} " \
                         "of the height)"
                break
    if reason is None:
        (ra, ca), (rb, cb) = [(np.nonzero((lab == i).any(axis=1))[0], np.nonzero((lab == i).any(axis=0))[0])
                              for _, i in (best["left"], best["right"])]
        overlap = (min(ra.max(), rb.max()) - max(ra.min(), rb.min())) / max(ra.max() - ra.min(), rb.max() - rb.min(), 1)
        gap = (cb.min() - ca.max()) / s_w
        if overlap < r["min_vertical_overlap"] or not r["min_gap"] <= gap <= r["max_gap"]:
            reason = (f"lung fields not side by side as on a frontal film (height overlap {max(overlap, 0):.0%}, "
                      f"gap {gap:.0%} of the width)")
    if reason is None and conf < r["min_confidence"]:
        reason = f"lung fields found with low confidence ({conf:.2f})"
    return LungFields(mask, tuple(float(v) for v in box), (left, right), total, conf, reason)


def read_segmenter_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a lung-segmenter checkpoint (format, sha256, metadata); no model built."""
    from cxr_node.model.checkpoint import read_verified

    ck = read_verified(path)
    meta = ck["meta"]
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: lung-segmenter metadata lacks {', '.join(missing)}")
    if meta["kind"] != KIND:
        raise CheckpointError(f"{path}: not a lung-segmenter checkpoint (kind {meta['kind']!r})")
    if meta["arch"] != ARCH:
        raise CheckpointError(f"{path}: lung-segmenter arch {meta['arch']!r} is not {ARCH!r}")
    return ck


class LungSegmenter:
    """Loads and verifies a segmenter checkpoint once; :meth:`analyse` runs one film."""

    def __init__(self, checkpoint: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> None:
        self.checkpoint = str(checkpoint or DEFAULT_CHECKPOINT)
        ck = read_segmenter_checkpoint(self.checkpoint)
        meta = dict(ck["meta"])
        meta["weights_sha256"] = ck["sha256"]
        self.meta = meta
        self.weights_sha256: str = ck["sha256"]
        self.version = str(meta["version"])
        self.size = int(meta["input_size"])
        self.threshold = float(meta["threshold"])
        self.rules = {**DEFAULT_PLAUSIBILITY, **meta["plausibility"]}
        self.device = torch.device(device)
        model = build_segmenter(meta["channels"], meta["strides"], meta["num_res_units"])
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in ck["state_dict"].items()}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.checkpoint}: weights do not fit the lung UNet: "
                                  f"{str(e).splitlines()[0]}") from e
        self.model = model.to(self.device).eval()

    def probability(self, img: np.ndarray | torch.Tensor) -> np.ndarray:
        """Lung probability ``(S, S)`` float32 for a film in [0, 1]."""
        x = segmenter_input(img, self.size).to(self.device)
        with torch.inference_mode():
            return torch.sigmoid(self.model(x))[0, 0].float().cpu().numpy()

    def analyse(self, img: np.ndarray | torch.Tensor) -> LungFields:
        return analyse_mask(self.probability(img), self.threshold, self.rules)


_shared: dict[str, LungSegmenter] = {}
_shared_lock = threading.Lock()


def shared_segmenter(checkpoint: str | os.PathLike[str] | None = None) -> LungSegmenter:
    """One segmenter per checkpoint path per process (it is small and stateless at inference).
    Locked: the model's preload thread and a worker can ask at once, and must get one instance."""
    key = str(Path(checkpoint or DEFAULT_CHECKPOINT).resolve())
    with _shared_lock:
        if key not in _shared:
            _shared[key] = LungSegmenter(key)
            log.info("lung segmenter %s loaded from %s", _shared[key].version, key)
        return _shared[key]


def crop(img: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Crop ``(C, H, W)`` or ``(H, W)`` to a fractional box ``y0, y1, x0, x1`` (at least 8 px each way)."""
    h, w = img.shape[-2:]
    y0, y1, x0, x1 = box
    r0, r1 = int(np.floor(y0 * h)), int(np.ceil(y1 * h))
    c0, c1 = int(np.floor(x0 * w)), int(np.ceil(x1 * w))
    if r1 - r0 < 8 or c1 - c0 < 8:
        return img
    return img[..., r0:r1, c0:c1]
