"""Reading a radiograph: a DICOM dataset or a PNG/JPEG file -> float32 in [0, 1], bright = dense,
as a viewer shows it (the first step of the chain in :mod:`cxr_node.model.preprocess`).

DICOM: Modality LUT (or Rescale Slope/Intercept) -> VOI LUT Sequence, else the first window
(Window Center/Width with VOI LUT Function), else robust percentile scaling -> MONOCHROME1
inversion. Anything that is not a usable 2-D greyscale radiograph raises
:class:`cxr_node.errors.PreprocessError` naming the rule it broke; a header element pydicom cannot
read is refused by name (code ``unreadable``), never by value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from monai.transforms import Transform
from pydicom.dataset import Dataset

from cxr_node.errors import PreprocessError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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
        raise PreprocessError("the film has no pixel data: its dataset has no Pixel Data element, so there is "
                              "no image to analyse")
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
