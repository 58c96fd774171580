"""Augmentation that blurs the differences between scanners, sites and publication routes (v3).

A model trained on films from several sources learns the source if it can: its contrast curve,
sharpness, noise, JPEG history, resolution, borders and burnt-in text. Each transform here
randomises one of those on a float ``(1, H, W)`` image in [0, 1] (the training cache's films):

=====================  ======================================================================
``RandGamma``          gamma curve (another site's look-up table)
``RandContrast``       linear contrast and brightness around the mean
``RandBlurSharpen``    Gaussian blur or unsharp masking (detector / post-processing sharpness)
``RandGaussianNoiseX`` additive Gaussian noise (quantum noise, low dose)
``RandJPEG``           JPEG re-compression at a random quality (papers, websites, PACS exports)
``RandResolutionDrop`` area down-sampling then bilinear up-sampling (small figure panels)
``RandBorderOcclusion`` black or white bands along random edges (collimation, scanned borders)
``RandMarker``         bright rectangles and letters near the edges ("L", "AP", "PORTABLE", ...)
=====================  ======================================================================

plus MONAI ``RandAffine`` (small rotation, scale = crop or pad, translation) in
:func:`make_v3_augment`. Every transform is a MONAI array transform (``Randomizable``) that draws
only from its own ``self.R``, so ``Compose.set_random_state(seed)`` makes a pipeline repeatable,
and each has a dictionary wrapper (``...d``) applying one draw to every key.
"""

from __future__ import annotations

import io
import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

MARKER_TEXTS = ("L", "R", "A", "B", "a", "b", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "day 3", "1", "2")


def _tensor(img: Any) -> torch.Tensor:
    t = img.as_tensor() if hasattr(img, "as_tensor") else img
    return torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t, dtype=torch.float32)


class _RandArray(Randomizable, Transform):
    """Base: with probability ``prob`` draw parameters in :meth:`draw` and apply :meth:`apply`."""

    def __init__(self, prob: float) -> None:
        self.prob = float(prob)
        self._do = False

    def draw(self, shape: Sequence[int]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def randomize(self, data: Any = None) -> None:
        self._do = bool(self.R.random_sample() < self.prob)
        if self._do:
            shape = tuple(getattr(data, "shape", (1, 64, 64)))
            self.draw(shape)

    def __call__(self, img: Any, randomize: bool = True) -> torch.Tensor:
        t = _tensor(img)
        if randomize:
            self.randomize(t)
        if not self._do:
            return t
        return self.apply(t).clamp(0.0, 1.0)


class RandGamma(_RandArray):
    """``x ** gamma`` with log-uniform gamma in ``gamma_range``."""

    def __init__(self, prob: float = 0.5, gamma_range: Sequence[float] = (0.7, 1.5)) -> None:
        super().__init__(prob)
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self.gamma = 1.0

    def draw(self, shape: Sequence[int]) -> None:
        lo, hi = np.log(self.gamma_range[0]), np.log(self.gamma_range[1])
        self.gamma = float(np.exp(self.R.uniform(lo, hi)))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(0.0, 1.0).pow(self.gamma)


class RandContrast(_RandArray):
    """``(x - mean) * factor + mean + shift``."""

    def __init__(self, prob: float = 0.5, factor_range: Sequence[float] = (0.7, 1.35), max_shift: float = 0.08) -> None:
        super().__init__(prob)
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        self.max_shift = float(max_shift)
        self.factor, self.shift = 1.0, 0.0

    def draw(self, shape: Sequence[int]) -> None:
        self.factor = float(self.R.uniform(*self.factor_range))
        self.shift = float(self.R.uniform(-self.max_shift, self.max_shift))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        m = t.mean()
        return (t - m) * self.factor + m + self.shift


def _gauss_blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = t.shape[0]
    y = t[None]
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[0]


class RandBlurSharpen(_RandArray):
    """Half the time a Gaussian blur (sigma in ``sigma_range`` px), else unsharp masking
    ``x + amount * (x - blur(x))``."""

    def __init__(self, prob: float = 0.4, sigma_range: Sequence[float] = (0.4, 1.4),
                 amount_range: Sequence[float] = (0.3, 1.5)) -> None:
        super().__init__(prob)
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        self.amount_range = (float(amount_range[0]), float(amount_range[1]))
        self.sharpen, self.sigma, self.amount = False, 1.0, 0.0

    def draw(self, shape: Sequence[int]) -> None:
        self.sharpen = bool(self.R.random_sample() < 0.5)
        self.sigma = float(self.R.uniform(*self.sigma_range))
        self.amount = float(self.R.uniform(*self.amount_range))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        b = _gauss_blur(t, self.sigma)
        return t + self.amount * (t - b) if self.sharpen else b


class RandGaussianNoiseX(_RandArray):
    """Additive Gaussian noise with standard deviation drawn from [0, ``max_std``]."""

    def __init__(self, prob: float = 0.3, max_std: float = 0.03) -> None:
        super().__init__(prob)
        self.max_std = float(max_std)
        self.noise: np.ndarray | None = None

    def draw(self, shape: Sequence[int]) -> None:
        std = float(self.R.uniform(0.0, self.max_std))
        self.noise = self.R.normal(0.0, std, size=tuple(shape)).astype(np.float32)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t + torch.from_numpy(self.noise)


class RandJPEG(_RandArray):
    """Encode as 8-bit JPEG at a quality in ``quality_range`` and decode again (PIL)."""

    def __init__(self, prob: float = 0.4, quality_range: Sequence[int] = (20, 90)) -> None:
        super().__init__(prob)
        self.quality_range = (int(quality_range[0]), int(quality_range[1]))
        self.quality = 75

    def draw(self, shape: Sequence[int]) -> None:
        self.quality = int(self.R.randint(self.quality_range[0], self.quality_range[1] + 1))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        out = torch.empty_like(t)
        for c in range(t.shape[0]):
            a = np.clip(np.rint(t[c].numpy() * 255.0), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(a, mode="L").save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            with Image.open(buf) as im:
                out[c] = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
        return out


class RandResolutionDrop(_RandArray):
    """Area down-sample by a factor in ``scale_range`` (< 1), then bilinear back to the size."""

    def __init__(self, prob: float = 0.3, scale_range: Sequence[float] = (0.35, 0.8)) -> None:
        super().__init__(prob)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale = 1.0

    def draw(self, shape: Sequence[int]) -> None:
        self.scale = float(self.R.uniform(*self.scale_range))

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        small = F.interpolate(t[None], size=(max(8, round(h * self.scale)), max(8, round(w * self.scale))),
                              mode="area")
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]


class RandBorderOcclusion(_RandArray):
    """Black (or, one time in four, white) bands along 1-4 random edges, each up to ``max_frac``
    of the side."""

    def __init__(self, prob: float = 0.3, max_frac: float = 0.12) -> None:
        super().__init__(prob)
        self.max_frac = float(max_frac)
        self.bands: list[tuple[str, int]] = []
        self.value = 0.0

    def draw(self, shape: Sequence[int]) -> None:
        h, w = shape[-2:]
        n = int(self.R.randint(1, 5))
        sides = list(self.R.permutation(["top", "bottom", "left", "right"])[:n])
        self.bands = []
        for s in sides:
            side_len = h if s in ("top", "bottom") else w
            self.bands.append((str(s), int(self.R.randint(1, max(2, int(self.max_frac * side_len) + 1)))))
        self.value = 1.0 if self.R.random_sample() < 0.25 else 0.0

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        for side, k in self.bands:
            if side == "top":
                t[..., :k, :] = self.value
            elif side == "bottom":
                t[..., -k:, :] = self.value
            elif side == "left":
                t[..., :, :k] = self.value
            else:
                t[..., :, -k:] = self.value
        return t


class RandMarker(_RandArray):
    """1-3 burnt-in markers near the edges: bright filled rectangles (score boxes, labels) or
    letters/words (``MARKER_TEXTS``) in white or black, as on published and portable films."""

    def __init__(self, prob: float = 0.3, max_markers: int = 3, edge_frac: float = 0.22) -> None:
        super().__init__(prob)
        self.max_markers = int(max_markers)
        self.edge_frac = float(edge_frac)
        self.marks: list[dict[str, Any]] = []

    def draw(self, shape: Sequence[int]) -> None:
        h, w = shape[-2:]
        self.marks = []
        for _ in range(int(self.R.randint(1, self.max_markers + 1))):
            text = bool(self.R.random_sample() < 0.6)
            size = int(max(6, self.R.uniform(0.06, 0.14) * min(h, w)))
            # a point within edge_frac of one of the four edges
            side = int(self.R.randint(0, 4))
            u = float(self.R.uniform(0.0, 1.0))
            v = float(self.R.uniform(0.0, self.edge_frac))
            x, y = {0: (u, v), 1: (u, 1 - v), 2: (v, u), 3: (1 - v, u)}[side]
            self.marks.append({
                "text": str(MARKER_TEXTS[int(self.R.randint(0, len(MARKER_TEXTS)))]) if text else "",
                "x": int(x * (w - 1)), "y": int(y * (h - 1)), "size": size,
                "w": int(self.R.uniform(1.0, 3.0) * size), "value": 255 if self.R.random_sample() < 0.8 else 0,
            })

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        from PIL import Image, ImageDraw, ImageFont

        h, w = t.shape[-2:]
        mask = Image.new("L", (w, h), 0)
        ink = Image.new("L", (w, h), 0)
        dm, di = ImageDraw.Draw(mask), ImageDraw.Draw(ink)
        for m in self.marks:
            if m["text"]:
                font = ImageFont.load_default(size=m["size"])
                dm.text((m["x"], m["y"]), m["text"], fill=255, font=font, anchor="mm")
                di.text((m["x"], m["y"]), m["text"], fill=m["value"], font=font, anchor="mm")
            else:
                box = [m["x"] - m["w"] // 2, m["y"] - m["size"] // 2, m["x"] + m["w"] // 2, m["y"] + m["size"] // 2]
                dm.rectangle(box, fill=255)
                di.rectangle(box, fill=m["value"])
        a = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
        v = torch.from_numpy(np.asarray(ink, dtype=np.float32) / 255.0)
        return t * (1 - a) + v * a


class RandDict(Randomizable, MapTransform):
    """Dictionary wrapper for any transform here: one draw, applied to every key."""

    def __init__(self, keys: KeysCollection, transform: _RandArray, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandDict":
        super().set_random_state(seed, state)
        self.transform.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        self.transform.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        if first is None:
            return d
        self.randomize(_tensor(d[first]))
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


def _dict_class(cls: type) -> type:
    def __init__(self, keys: KeysCollection, *args: Any, allow_missing_keys: bool = False, **kw: Any) -> None:
        RandDict.__init__(self, keys, cls(*args, **kw), allow_missing_keys)

    return type(cls.__name__ + "d", (RandDict,), {"__init__": __init__, "__doc__": f"Dictionary {cls.__name__}."})


RandGammad = _dict_class(RandGamma)
RandContrastd = _dict_class(RandContrast)
RandBlurSharpend = _dict_class(RandBlurSharpen)
RandGaussianNoiseXd = _dict_class(RandGaussianNoiseX)
RandJPEGd = _dict_class(RandJPEG)
RandResolutionDropd = _dict_class(RandResolutionDrop)
RandBorderOcclusiond = _dict_class(RandBorderOcclusion)
RandMarkerd = _dict_class(RandMarker)


class Clamp01(Transform):
    def __call__(self, img: Any) -> torch.Tensor:
        return _tensor(img).clamp(0.0, 1.0)


def make_v4_augment(size: int = 128):
    """The v4 recipe: v3's, with the down-scale-and-up-scale of every class at probability 0.5 over a
    wider range (0.3-0.9): every tuberculosis film of the training data comes from one hospital whose
    films were published at 128 px and up-scaled, so blur must not become evidence of tuberculosis
    (issue 20). Everything else as :func:`make_v3_augment`."""
    return make_v3_augment(size, resolution_prob=0.5, resolution_range=(0.3, 0.9))


def make_v3_augment(size: int = 128, resolution_prob: float = 0.25,
                    resolution_range: Sequence[float] = (0.35, 0.8)):
    """The v3 recipe on a [0, 1] ``(1, size, size)`` image: geometry first (MONAI ``RandAffine``:
    rotation +-10 deg, scale 0.88-1.12, translation +-6% of ``size``), then the look of the film (window jitter, gamma,
    contrast, blur/sharpen, resolution drop, JPEG, noise), then occlusion (borders, markers)."""
    from monai.transforms import Compose, RandAffine

    from training.train.transforms import RandWindowJitter

    return Compose([
        RandAffine(prob=0.7, rotate_range=math.radians(10), scale_range=(0.12, 0.12),
                   translate_range=(0.06 * size, 0.06 * size),
                   padding_mode="border", mode="bilinear"),
        RandWindowJitter(prob=0.4, max_shift=0.06, gamma_range=(0.85, 1.18)),
        RandGamma(prob=0.4),
        RandContrast(prob=0.4),
        RandBlurSharpen(prob=0.4),
        RandResolutionDrop(prob=resolution_prob, scale_range=resolution_range),
        RandJPEG(prob=0.35),
        RandGaussianNoiseX(prob=0.3),
        RandBorderOcclusion(prob=0.25),
        RandMarker(prob=0.3),
        Clamp01(),
    ])
