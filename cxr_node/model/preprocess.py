"""Preprocessing: a DICOM dataset or an image file -> a normalised model input tensor.

Training imports these transforms (``training/`` never copies them), and the parameters travel
in the checkpoint (``meta["preprocess"]``), so serving applies exactly what training applied.

The chain, for one film::

    LoadRadiograph      DICOM: Modality LUT, VOI LUT / window or robust percentiles,
                        MONOCHROME1 inversion -> float32 (1, H, W) in [0, 1].
                        PNG/JPEG: 8/16-bit greyscale -> float32 (1, H, W) in [0, 1].
    AreaDownscale       area-average to at most ``downscale_max`` px on the longest side
    CLAHE               skimage.exposure.equalize_adapthist, output in [0, 1]
    LungCrop            (``lung_crop`` set) crop to the lung fields' box plus a margin
    ResizeSquare        to ``input_size`` x ``input_size`` (area down, bilinear up)
    ---- "base" ends here: training caches this as uint8 ----
    NormalizeIntensity  per-image zero mean, unit variance (``normalize: "zscore"``)

The chain is defined once, in :func:`chain`; training, serving and the dictionary form
(:class:`ApplyToKeys` over each array transform) all build from it. :func:`prepare` runs it for
serving and keeps the display film and the lung fields (:mod:`cxr_node.model.lungs`); with
``lung_crop`` set, the chain crops to the lungs after CLAHE. Nothing here is random: training's
augmentations live in ``training/`` (``training.train.transforms``, ``training.train.augment``).

Anything that is not a usable 2-D greyscale radiograph raises
:class:`cxr_node.errors.PreprocessError` naming the rule it broke.

Nothing heavy is built at import time; torch, MONAI, pydicom and skimage are imported here
because every caller of this module needs them anyway.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, Transform

from cxr_node.errors import PreprocessError
from cxr_node.model.radiograph import LoadRadiograph

log = logging.getLogger(__name__)

#: Defaults for the preprocessing parameters that travel in the checkpoint.
DEFAULT_PARAMS: dict[str, Any] = {
    "version": 1,
    "percentiles": [0.5, 99.5],  # robust scaling when a DICOM has no VOI LUT / window
    "min_size": 64,  # smaller films are refused
    "downscale_max": 512,  # area downscale before CLAHE
    "clahe_clip_limit": 0.01,
    "clahe_kernel_fraction": 0.125,  # kernel = fraction of each side (skimage's default 1/8)
    "clahe_nbins": 256,
    "input_size": 224,
    "normalize": "zscore",
    # None, or {"margin": 0.1, "segmenter_sha256": "<hex>"}: crop to the lung fields' box (see cxr_node.model.lungs)
    "lung_crop": None,
}
#: Parameters added after version 1, with the value that reproduces older checkpoints.
LATER_PARAMS: dict[str, Any] = {"lung_crop": None}

def make_params(**overrides: Any) -> dict[str, Any]:
    """A complete parameter dict: the defaults updated with ``overrides`` (unknown keys refused)."""
    unknown = set(overrides) - set(DEFAULT_PARAMS)
    if unknown:
        raise ValueError(f"unknown preprocessing parameter(s): {', '.join(sorted(unknown))}")
    p = copy.deepcopy(DEFAULT_PARAMS)
    p.update(overrides)
    return p


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a parameter dict (e.g. one read from a checkpoint); returns a plain copy."""
    missing = [k for k in DEFAULT_PARAMS if k not in params and k not in LATER_PARAMS]
    if missing:
        raise PreprocessError(f"preprocessing parameters lack {', '.join(missing)}")
    p = {**LATER_PARAMS, **params}
    lc = p["lung_crop"]
    if lc is not None and not (isinstance(lc, dict) and isinstance(lc.get("margin"), (int, float))
                               and 0 <= lc["margin"] <= 1):
        raise PreprocessError(f"preprocessing 'lung_crop' must be null or {{'margin': 0..1, 'segmenter_sha256': ...}} "
                              f"(got {lc!r})")
    if p["normalize"] not in ("zscore", "none"):
        raise PreprocessError(f"preprocessing 'normalize' must be 'zscore' or 'none' (got {p['normalize']!r})")
    lo, hi = p["percentiles"]
    if not 0 <= lo < hi <= 100:
        raise PreprocessError(f"preprocessing 'percentiles' must satisfy 0 <= low < high <= 100 (got {lo}, {hi})")
    if int(p["input_size"]) < 16:
        raise PreprocessError(f"preprocessing 'input_size' must be at least 16 (got {p['input_size']})")
    return p


# --------------------------------------------------------------------------- array transforms


class AreaDownscale(Transform):
    """Area-average ``(C, H, W)`` down so the longest side is at most ``max_size`` (never upscales)."""

    def __init__(self, max_size: int = 512) -> None:
        self.max_size = int(max_size)

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray:
        t = torch.as_tensor(np.asarray(img, dtype=np.float32))
        h, w = t.shape[-2:]
        longest = max(h, w)
        if longest <= self.max_size:
            return t.numpy()
        scale = self.max_size / longest
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        out = F.interpolate(t[None], size=size, mode="area")[0]
        return out.numpy()


class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalisation (skimage) per channel; output in [0, 1]."""

    def __init__(self, clip_limit: float = 0.01, kernel_fraction: float = 0.125, nbins: int = 256) -> None:
        self.clip_limit = float(clip_limit)
        self.kernel_fraction = float(kernel_fraction)
        self.nbins = int(nbins)

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray:
        from skimage.exposure import equalize_adapthist

        a = np.asarray(img, dtype=np.float32)
        out = np.empty_like(a)
        for c in range(a.shape[0]):
            ch = np.clip(a[c], 0.0, 1.0)
            ks = tuple(max(2, int(round(s * self.kernel_fraction))) for s in ch.shape)
            out[c] = equalize_adapthist(ch, kernel_size=ks, clip_limit=self.clip_limit, nbins=self.nbins)
        return out


class ResizeSquare(Transform):
    """Resize ``(C, H, W)`` to ``(C, size, size)``: area when shrinking, bilinear when enlarging."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray:
        t = torch.as_tensor(np.asarray(img, dtype=np.float32))
        h, w = t.shape[-2:]
        if (h, w) == (self.size, self.size):
            return t.numpy()
        if h >= self.size and w >= self.size:
            out = F.interpolate(t[None], size=(self.size, self.size), mode="area")[0]
        else:
            out = F.interpolate(t[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return out.numpy()


class NormalizeIntensity(Transform):
    """Per-image zero mean / unit variance (``"zscore"``), or nothing (``"none"``). Returns a tensor."""

    def __init__(self, mode: str = "zscore", eps: float = 1e-6) -> None:
        if mode not in ("zscore", "none"):
            raise ValueError(f"normalize mode must be 'zscore' or 'none' (got {mode!r})")
        self.mode = mode
        self.eps = float(eps)

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(img, dtype=torch.float32)
        if self.mode == "none":
            return t
        dims = tuple(range(-3, 0)) if t.ndim >= 3 else tuple(range(t.ndim))
        mean = t.mean(dim=dims, keepdim=True)
        std = t.std(dim=dims, keepdim=True, unbiased=False)
        return (t - mean) / (std + self.eps)


# --------------------------------------------------------------------------- dictionary wrappers


class _MapArray(MapTransform):
    transform: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


# --------------------------------------------------------------------------- lung crop


class LungCrop(Transform):
    """Crop ``(1, H, W)`` to the lung fields' box grown by ``margin`` (:mod:`cxr_node.model.lungs`).

    The segmenter is the bundled one (or ``checkpoint``), loaded once per process; when
    ``segmenter_sha256`` is given, a segmenter with other weights is refused, so a classifier is
    always served with the crop it was trained with. A film with no lung fields is left whole
    (serving refuses such films before this step; training keeps them uncropped)."""

    def __init__(self, margin: float = 0.1, segmenter_sha256: str | None = None,
                 checkpoint: str | os.PathLike[str] | None = None) -> None:
        self.margin = float(margin)
        self.segmenter_sha256 = segmenter_sha256
        self.checkpoint = checkpoint
        self._segmenter = None

    @property
    def segmenter(self):
        if self._segmenter is None:
            from cxr_node.errors import CheckpointError
            from cxr_node.model.lungs import shared_segmenter

            seg = shared_segmenter(self.checkpoint)
            if self.segmenter_sha256 and seg.weights_sha256 != self.segmenter_sha256:
                raise CheckpointError(f"the classifier was trained with lung segmenter {self.segmenter_sha256[:12]}..., "
                                      f"but {seg.checkpoint} has weights {seg.weights_sha256[:12]}...")
            self._segmenter = seg
        return self._segmenter

    def analyse_and_crop(self, img: np.ndarray, fields=None):
        """``(1, H, W)`` -> (cropped image, the LungFields found, the box used or None)."""
        from cxr_node.model.lungs import crop

        fields = fields if fields is not None else self.segmenter.analyse(img)
        box = fields.crop_box(self.margin) if fields.box is not None else None
        return (crop(img, box) if box else img), fields, box

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.analyse_and_crop(np.asarray(img, dtype=np.float32))[0]


# --------------------------------------------------------------------------- the one chain


def chain(params: Mapping[str, Any], normalize: bool = True, checkpoint: str | os.PathLike[str] | None = None
          ) -> list[Transform]:
    """The preprocessing steps, in order, for a checkpoint's ``params``: defined here once and used
    by training (the uint8 cache is the chain without normalisation), serving and the dict form."""
    p = check_params(params)
    steps: list[Transform] = [
        LoadRadiograph(p["percentiles"], p["min_size"]),
        AreaDownscale(p["downscale_max"]),
        CLAHE(p["clahe_clip_limit"], p["clahe_kernel_fraction"], p["clahe_nbins"]),
    ]
    if p["lung_crop"]:
        steps.append(LungCrop(p["lung_crop"]["margin"], p["lung_crop"].get("segmenter_sha256"), checkpoint))
    steps.append(ResizeSquare(p["input_size"]))
    if normalize:
        steps.append(NormalizeIntensity(p["normalize"]))
    return steps


def base_transform(params: Mapping[str, Any]) -> Compose:
    """Source -> float32 ``(1, S, S)`` in [0, 1] (before normalisation). Training caches this as uint8."""
    return Compose(chain(params, normalize=False))


def normalize_transform(params: Mapping[str, Any]) -> NormalizeIntensity:
    return NormalizeIntensity(check_params(params)["normalize"])


def preprocess_transform(params: Mapping[str, Any]) -> Compose:
    """Source (path or Dataset) -> model input tensor ``(1, S, S)``: what serving applies."""
    return Compose(chain(params))


class ApplyToKeys(_MapArray):
    """Dictionary wrapper for any array transform of the chain."""

    def __init__(self, keys: KeysCollection, transform: Transform, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform


def preprocess_dict_transform(params: Mapping[str, Any], keys: KeysCollection = "image") -> Compose:
    """The same chain as :func:`preprocess_transform` over dictionary ``keys``."""
    return Compose([ApplyToKeys(keys, t) for t in chain(params)])


@dataclass(frozen=True)
class Prepared:
    """One film through the chain, with what serving needs besides the model input."""

    x: torch.Tensor                  # (1, S, S) model input
    display: np.ndarray              # (H, W) in [0, 1]: the film as a person sees it (no CLAHE)
    lungs: Any = None                # cxr_node.model.lungs.LungFields, when a segmenter ran
    box: tuple[float, float, float, float] | None = None  # the crop applied (fractions of display)
    film: np.ndarray | None = None   # (H, W) in [0, 1]: the display film at the source's resolution


def prepare(src: Any, params: Mapping[str, Any], segmenter: Any = None) -> Prepared:
    """Decode once and run :func:`chain`, keeping the display film and the lung fields.

    ``segmenter`` (a :class:`cxr_node.model.lungs.LungSegmenter`) analyses the lungs even when the
    checkpoint does not crop, for the eligibility rules; a cropping chain uses it for its crop."""
    display, lungs, box, img, film = None, None, None, src, None
    for step in chain(params):
        if isinstance(step, LungCrop):
            if segmenter is not None:
                step._segmenter = step._segmenter or segmenter
            img, lungs, box = step.analyse_and_crop(img, lungs)
            continue
        img = step(img)
        if isinstance(step, LoadRadiograph):
            film = np.asarray(img, dtype=np.float32)[0]
        elif isinstance(step, AreaDownscale):
            display = np.asarray(img, dtype=np.float32)[0]
        elif isinstance(step, CLAHE) and segmenter is not None:
            lungs = segmenter.analyse(img)
    return Prepared(torch.as_tensor(img, dtype=torch.float32), display, lungs, box, film)


def display_and_contrast(src: Any, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Decode once: the film as a person sees it (VOI applied, area-downscaled, no CLAHE) and the
    same film after CLAHE, both float32 ``(H, W)`` in [0, 1]. The lung segmenter reads the second."""
    steps = chain({**dict(params), "lung_crop": None}, normalize=False)[:3]
    small = steps[1](steps[0](src))
    return small[0], steps[2](small)[0]


def preprocess_with_display(src: Any, params: Mapping[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Decode once; return the model input ``(1, S, S)`` (as :func:`preprocess_transform`) and the
    film as a person sees it (VOI applied, no CLAHE, area-downscaled): float32 ``(H, W)`` in [0, 1]."""
    pr = prepare(src, params)
    return pr.x, pr.display


def to_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """[0, 1] float -> uint8 (rounded), for the training cache."""
    a = np.asarray(img, dtype=np.float32)
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
