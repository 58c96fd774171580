"""The Grad-CAM picture a reader sees: grey film, heat map only inside the lungs and only where it
matters, and a legend strip below the film (so it covers no lung) with a colour scale.

Used by the Secondary Capture sent to the PACS and by the offline ``triage --overlay-dir`` PNGs,
so both look alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Heat below this (Grad-CAM is normalised to [0, 1] per image) is left transparent.
OVERLAY_THRESHOLD = 0.35
OVERLAY_MAX_ALPHA = 0.6
COLORMAP = "jet"


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.tensor(np.array(a, dtype=np.float32))[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def place_cam(cam: np.ndarray, shape: tuple[int, int], box: Sequence[float] | None = None) -> np.ndarray:
    """The model's map (over its square input) -> the film's ``shape``. With a lung crop ``box``
    (fractions y0, y1, x0, x1) the map covers the box only; the rest is 0."""
    h, w = shape
    if box is None:
        return np.clip(_resize(cam, (h, w)), 0.0, 1.0)
    y0, y1, x0, x1 = box
    r0, r1 = int(np.floor(y0 * h)), max(int(np.ceil(y1 * h)), int(np.floor(y0 * h)) + 1)
    c0, c1 = int(np.floor(x0 * w)), max(int(np.ceil(x1 * w)), int(np.floor(x0 * w)) + 1)
    out = np.zeros((h, w), dtype=np.float32)
    out[r0:r1, c0:c1] = np.clip(_resize(cam, (r1 - r0, c1 - c0)), 0.0, 1.0)
    return out


def heat(film_shape: tuple[int, int], cam: np.ndarray, box: Sequence[float] | None = None,
         lung_mask: np.ndarray | None = None, smooth: float = 0.015) -> np.ndarray:
    """The map shown to a reader, (H, W) in [0, 1]: placed on the film, smoothed (Gaussian, sigma a
    fraction of the film's size), and, given the lung fields, kept only inside them (soft edge)."""
    from scipy import ndimage

    h, w = film_shape
    c = place_cam(cam, (h, w), box)
    if smooth > 0:
        c = ndimage.gaussian_filter(c, sigma=max(1.0, smooth * max(h, w)))
    if lung_mask is not None:
        m = _resize(np.asarray(lung_mask, dtype=np.float32), (h, w))
        m = np.clip(ndimage.gaussian_filter(m, sigma=max(1.0, 0.01 * max(h, w))), 0.0, 1.0)
        c = c * m
    top = float(c.max())
    return c / top if top > 0 else c


def render_overlay(film: np.ndarray, cam: np.ndarray, threshold: float = OVERLAY_THRESHOLD,
                   max_alpha: float = OVERLAY_MAX_ALPHA, box: Sequence[float] | None = None,
                   lung_mask: np.ndarray | None = None) -> np.ndarray:
    """Grey film (H, W) in [0, 1] + Grad-CAM (h, w) in [0, 1] -> RGB uint8 (H, W, 3).

    Pixels below ``threshold`` (and, with ``lung_mask``, outside the lungs) keep the grey film;
    above it a colour is blended in with opacity rising from 0 at the threshold to ``max_alpha``."""
    from matplotlib import colormaps

    c = heat(film.shape, cam, box, lung_mask) if (box is not None or lung_mask is not None) \
        else place_cam(cam, film.shape)
    grey = np.repeat(np.clip(film, 0.0, 1.0)[..., None], 3, axis=2)
    colour = colormaps[COLORMAP](c)[..., :3]
    alpha = np.where(c >= threshold, (c - threshold) / max(1e-6, 1.0 - threshold) * max_alpha, 0.0)[..., None]
    rgb = grey * (1.0 - alpha) + colour * alpha
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _wrap(draw, text: str, font, width: int) -> list[str]:  # noqa: ANN001 - PIL objects
    """Split ``text`` into lines that fit ``width`` pixels (at spaces; long words are cut)."""
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    lines.append(cur)
    out = []
    for line in lines:
        while draw.textlength(line, font=font) > width and len(line) > 4:
            line = line[:-2]
        out.append(line)
    return out


def with_legend(rgb: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]],
                threshold: float = OVERLAY_THRESHOLD, colour_bar: bool = True) -> np.ndarray:
    """Add a legend strip below an RGB image: every line wrapped to fit (never cut off), then a
    colour bar from the threshold (transparent below) to 1 labelled "heat: low ... high"."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    h, w, _ = rgb.shape
    size = max(10, min(28, w // 40))
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [(t, c) for text, c in lines for t in _wrap(probe, text, font, w - size)]
    line_h = int(size * 1.35)
    bar_h = size if colour_bar else 0
    strip_h = len(wrapped) * line_h + (bar_h + line_h if colour_bar else 0) + size
    canvas = Image.new("RGB", (w, h + strip_h), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + size // 2
    for text, colour in wrapped:
        draw.text((size // 2, y), text, fill=colour, font=font)
        y += line_h
    if colour_bar:
        left_label, right_label = "heat: none", "high"
        x0 = size // 2 + int(draw.textlength(left_label, font=font)) + size // 2
        x1 = w - size - int(draw.textlength(right_label, font=font))
        if x1 - x0 >= 20:
            draw.text((size // 2, y), left_label, fill=(200, 200, 200), font=font)
            ramp = np.linspace(0.0, 1.0, x1 - x0)
            cols = (colormaps[COLORMAP](ramp)[:, :3] * 255).astype(np.uint8)
            cols[ramp < threshold] = (90, 90, 90)  # below the threshold nothing is drawn on the film
            bar = np.repeat(cols[None], bar_h, axis=0)
            canvas.paste(Image.fromarray(bar), (x0, y + (line_h - bar_h) // 2))
            draw.text((x1 + size // 2, y), right_label, fill=(200, 200, 200), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def fit(film: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """Downscale a film (H, W) in [0, 1] so its longest side is at most ``max_side`` (box filter)."""
    from PIL import Image

    h, w = film.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return film
    img = Image.fromarray(np.clip(film * 255.0, 0, 255).astype(np.uint8))
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def legend_lines(prediction, model_name: str, model_version: str, calibration: str | None = None
                 ) -> list[tuple[str, tuple[int, int, int]]]:  # noqa: ANN001 - a Prediction
    flag = "URGENT" if prediction.urgent else prediction.priority.upper()
    probs = "  ".join(f"{label} {p:.0%}" for label, p in zip(prediction.labels, prediction.probabilities))
    lines = [
        ("NOT FOR DIAGNOSTIC USE", (255, 210, 0)),
        (f"{prediction.top_label} {prediction.top_probability:.0%}  [{flag}]", (255, 255, 255)),
        (probs, (200, 200, 200)),
        (f"{model_name} {model_version}" + (f" - {calibration}" if calibration else ""), (200, 200, 200)),
        (f"heat map: Grad-CAM for {prediction.cam_label or prediction.top_label}, shown inside the lung fields",
         (200, 200, 200)),
    ]
    return lines


def render_figure(film: np.ndarray, prediction, model_name: str, model_version: str,  # noqa: ANN001
                  box: Sequence[float] | None = None, lung_mask: np.ndarray | None = None,
                  max_side: int = 1024, calibration: str | None = None) -> np.ndarray:
    """The whole picture: film + heat map (inside the lungs) + legend with colour scale, RGB uint8."""
    if prediction.cam is None:
        raise ValueError("the prediction has no Grad-CAM map (predict with explain=True)")
    film = fit(film, max_side)
    rgb = render_overlay(film, prediction.cam, box=box, lung_mask=lung_mask)
    return with_legend(rgb, legend_lines(prediction, model_name, model_version, calibration))
