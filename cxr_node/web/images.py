"""Film and overlay pictures for the study page, rendered on request and kept in a small cache.

* An overlay is the Secondary Capture cxr-node made for the film (film, heat map inside the lungs,
  legend), read from ``data_dir/outbox``: the page shows exactly what the PACS received.
* A film without an overlay (not analysed, or its result file gone) is shown from the spool in
  grey: Modality LUT, then the VOI LUT or window, else percentiles, MONOCHROME1 inverted.

Both are downscaled to at most ``MAX_SIDE`` pixels and sent as PNG. The caller has already
checked that the UIDs belong to the study and the study to the database; paths are built from
those UIDs (or the instance row) and must resolve inside their directory.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

MAX_SIDE = 900
FULL_SIDE = 4096  # the full-size view: the picture as it is, up to this many pixels on a side
CACHE_BYTES = 64 * 1024 * 1024


class ImageCache:
    """Rendered PNGs by key, least recently used dropped first, at most ``limit`` bytes."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            v = self._items.get(key)
            if v is not None:
                self._items.move_to_end(key)
            return v

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self.limit and self._items:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


def inside(base: Path, rel: str) -> Path | None:
    """``base/rel`` if it resolves inside ``base`` and is a file, else None."""
    b = base.resolve()
    p = (b / rel).resolve()
    return p if p.is_relative_to(b) and p.is_file() else None


def _png(rgb_or_grey: np.ndarray, max_side: int = MAX_SIDE) -> bytes:
    from PIL import Image

    img = Image.fromarray(rgb_or_grey)
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _grey(ds) -> np.ndarray:  # noqa: ANN001 - a pydicom Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    a = ds.pixel_array
    if a.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        a = a[0]  # multi-frame: the first frame
    if a.ndim == 3:  # colour
        return np.asarray(a[..., :3], dtype=np.uint8) if a.dtype == np.uint8 else \
            np.clip(a[..., :3] / max(1, a.max()) * 255, 0, 255).astype(np.uint8)
    x = np.asarray(apply_modality_lut(a, ds), dtype=np.float64)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        x = np.asarray(apply_voi_lut(x, ds, index=0), dtype=np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    y = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        y = 1.0 - y
    return np.rint(y * 255).astype(np.uint8)


def render(path: Path, max_side: int = MAX_SIDE) -> bytes:
    """A DICOM image file -> PNG bytes (at most ``max_side`` pixels on a side; FULL_SIDE for the
    full-size view). Raises OSError/ValueError when it cannot be read."""
    from pydicom import dcmread

    ds = dcmread(path)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "RGB":
        a = ds.pixel_array
        if a.dtype == np.uint8 and a.ndim == 3:
            return _png(np.asarray(a), max_side)
    return _png(_grey(ds), max_side)
