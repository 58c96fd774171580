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
augmentations live in ``training/`` (``training.transforms``, ``training.augment``).

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
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, Transform
from pydicom.dataset import Dataset

from cxr_node.errors import PreprocessError

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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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


# --------------------------------------------------------------------------- DICOM pixel pipeline


def _window_linear(x: np.ndarray, center: float, width: float, exact: bool = False) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window mapped to [0, 1] (LINEAR or LINEAR_EXACT)."""
    if exact:
        if width <= 0:
            raise PreprocessError(f"Window Width must be > 0 for LINEAR_EXACT (got {width})")
        y = (x - (center - width / 2.0)) / width
    else:
        if width < 1:
            raise PreprocessError(f"Window Width must be >= 1 for LINEAR (got {width})")
        if width == 1:
            return (x > center - 0.5).astype(np.float32)
        y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(y, 0.0, 1.0)


def _window_sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    if width <= 0:
        raise PreprocessError(f"Window Width must be > 0 for SIGMOID (got {width})")
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DICOM element."""
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        value = value[0]
    return float(value)


def percentile_scale(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of ``x`` to 0..1 and clip."""
    lo, hi = np.percentile(x, [low, high])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        raise PreprocessError(f"image has no contrast (percentiles {low}/{high} are both {lo:g})")
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def header_value(ds: Dataset, keyword: str, convert: Any, default: Any = None) -> Any:
    """``convert(ds.keyword)`` (``default`` when absent or empty); a value that cannot be read or
    converted (``NumberOfFrames`` ``abc``, a 3-byte US, a non-numeric ``WindowCenter``) raises
    :class:`PreprocessError` naming the element, never the value (it may be patient data)."""
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            return default
        return convert(value)
    except PreprocessError:
        raise
    except Exception as e:  # pydicom converts lazily and raises many types for malformed values
        raise PreprocessError(f"unusable header: {keyword} cannot be read ({type(e).__name__})",
                              code="unreadable") from e


def _int_value(value: Any) -> int:
    return int(_first(value))


def check_dicom(ds: Dataset, min_size: int = 64) -> None:
    """Refuse datasets that are not a single-frame greyscale 2-D image, before decoding; a header
    element that cannot be read is refused the same way (``unusable header``)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError("DICOM dataset has no pixel data (Pixel Data element missing); "
                              "is it a structured report or a presentation state?")
    spp = header_value(ds, "SamplesPerPixel", _int_value, 1) or 1
    pi = header_value(ds, "PhotometricInterpretation", lambda v: str(v).strip().upper(), "")
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(f"DICOM image is colour (Samples per Pixel {spp}, Photometric Interpretation "
                              f"{pi or 'missing'}); a greyscale MONOCHROME1/2 radiograph is required")
    frames = header_value(ds, "NumberOfFrames", _int_value, 1) or 1
    if frames != 1:
        raise PreprocessError(f"DICOM image is multi-frame ({frames} frames); a single 2-D radiograph is required")
    rows, cols = header_value(ds, "Rows", _int_value, 0), header_value(ds, "Columns", _int_value, 0)
    if min(rows, cols) < min_size:
        raise PreprocessError(f"DICOM image is {cols}x{rows} px; at least {min_size} px on each side is required")
    for keyword in ("BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
        header_value(ds, keyword, _first)


def dicom_to_float(ds: Dataset, percentiles: Sequence[float] = (0.5, 99.5), min_size: int = 64) -> np.ndarray:
    """A DICOM dataset -> 2-D float32 in [0, 1], bright = dense (bone white), as a viewer shows it.

    Order (PS3.3 C.11): Modality LUT (or Rescale Slope/Intercept) -> VOI LUT Sequence, else the
    first window (Window Center/Width with VOI LUT Function), else robust percentile scaling ->
    MONOCHROME1 inversion (``1 - x``).
    """
    from pydicom.pixels import apply_modality_lut

    check_dicom(ds, min_size)
    try:
        raw = ds.pixel_array
    except Exception as e:  # decoders raise many types; re-raised with context
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise PreprocessError(f"DICOM pixel data cannot be decoded (transfer syntax {ts}): {e}") from e
    if raw.ndim != 2:
        raise PreprocessError(f"DICOM pixel array has shape {raw.shape}; a single 2-D greyscale frame is required")
    try:
        x = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    except Exception as e:  # a malformed Modality LUT Sequence or rescale values
        raise PreprocessError(f"unusable header: the Modality LUT cannot be applied ({type(e).__name__})",
                              code="unreadable") from e
    try:
        y = _voi(ds, x, percentiles)
    except PreprocessError:
        raise
    except Exception as e:  # a malformed VOI LUT Sequence, window or VOI LUT Function
        raise PreprocessError(f"unusable header: the VOI LUT or window cannot be applied ({type(e).__name__})",
                              code="unreadable") from e
    if header_value(ds, "PhotometricInterpretation", lambda v: str(v).strip().upper(), "") == "MONOCHROME1":
        y = 1.0 - y
    if not np.all(np.isfinite(y)) or float(y.max()) - float(y.min()) <= 0:
        raise PreprocessError("DICOM image is blank after the VOI transform (a single grey level)")
    return y.astype(np.float32)


def _voi(ds: Dataset, x: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """The VOI step of :func:`dicom_to_float`: LUT sequence, else the first window, else percentiles."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        y = np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), dtype=np.float64)
        nbits = int(item.LUTDescriptor[2])
        y = np.clip(y / float(2**nbits - 1), 0.0, 1.0)
    elif "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None and ds.WindowWidth is not None:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if fn == "SIGMOID":
            y = _window_sigmoid(x, c, w)
        else:
            y = _window_linear(x, c, w, exact=(fn == "LINEAR_EXACT"))
    else:
        y = percentile_scale(x, *percentiles)
    return y


def image_file_to_float(path: str | os.PathLike[str], min_size: int = 64) -> np.ndarray:
    """A PNG/JPEG file -> 2-D float32 in [0, 1]. RGB is accepted only if its channels are equal."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise PreprocessError(f"{Path(path).name}: image has {n_frames} frames; a single 2-D radiograph is required")
            if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im)
            elif mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(im.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise PreprocessError(f"{Path(path).name}: colour image ({mode} with differing channels); "
                                          "a greyscale radiograph is required")
                a = rgb[..., 0]
            elif mode == "1":
                raise PreprocessError(f"{Path(path).name}: 1-bit image; a greyscale radiograph is required")
            else:
                raise PreprocessError(f"{Path(path).name}: unsupported image mode {mode}")
    except FileNotFoundError as e:
        raise PreprocessError(f"{path}: file not found") from e
    except UnidentifiedImageError as e:
        raise PreprocessError(f"{Path(path).name}: not a readable PNG/JPEG image") from e
    except OSError as e:
        raise PreprocessError(f"{Path(path).name}: cannot read image: {e}") from e
    if a.ndim != 2:
        raise PreprocessError(f"{Path(path).name}: image array has shape {a.shape}; a 2-D greyscale image is required")
    h, w = a.shape
    if min(h, w) < min_size:
        raise PreprocessError(f"{Path(path).name}: image is {w}x{h} px; at least {min_size} px on each side is required")
    if a.dtype == np.uint8:
        y = a.astype(np.float32) / 255.0
    elif a.dtype in (np.uint16, np.dtype(">u2"), np.dtype("<u2")):
        y = a.astype(np.float32) / 65535.0
    else:  # 32-bit int or float greyscale: robust scaling
        y = percentile_scale(a.astype(np.float64), 0.5, 99.5).astype(np.float32)
    if float(y.max()) - float(y.min()) <= 0:
        raise PreprocessError(f"{Path(path).name}: image is blank (a single grey level)")
    return y


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------- array transforms


class LoadRadiograph(Transform):
    """Path (DICOM/PNG/JPEG) or pydicom ``Dataset`` -> float32 numpy ``(1, H, W)`` in [0, 1]."""

    def __init__(self, percentiles: Sequence[float] = (0.5, 99.5), min_size: int = 64) -> None:
        self.percentiles = tuple(float(p) for p in percentiles)
        self.min_size = int(min_size)

    def __call__(self, src: Any) -> np.ndarray:
        if isinstance(src, Dataset):
            img = dicom_to_float(src, self.percentiles, self.min_size)
        else:
            path = Path(src)
            if not path.is_file():
                raise PreprocessError(f"{path}: file not found")
            if _is_dicom_file(path):
                try:
                    ds = pydicom.dcmread(path)
                except Exception as e:  # pydicom raises several types for broken files
                    raise PreprocessError(f"{path.name}: not a readable DICOM file: {e}") from e
                if len(ds) == 0:
                    raise PreprocessError(f"{path.name}: not a readable DICOM file: no data elements after "
                                          "the preamble")
                try:
                    img = dicom_to_float(ds, self.percentiles, self.min_size)
                except PreprocessError as e:
                    raise PreprocessError(f"{path.name}: {e}") from e
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                img = image_file_to_float(path, self.min_size)
            else:
                # unknown suffix: try as an image, else refuse
                try:
                    img = image_file_to_float(path, self.min_size)
                except PreprocessError as e:
                    raise PreprocessError(f"{path.name}: neither a DICOM file (no DICM preamble) nor a "
                                          f"PNG/JPEG image") from e
        return img[None]


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

    def analyse_and_crop(self, img: np.ndarray, fields=None):  # noqa: ANN001 - LungFields
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
