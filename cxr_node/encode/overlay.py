"""The Grad-CAM picture a reader sees: grey film, a heat map only for the finding that raised the
flag (none for a routine call), only inside the lungs and only over the strongest part of the
map, and a legend strip below the film (so it covers no lung), scaled to the film, with the
operating point and a colour scale.

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
#: With the lung fields known, only this fraction of the lung area, where the map is strongest, is
#: coloured (Grad-CAM at the model's 4x4 to 7x7 feature map is coarse: tinting every pixel above
#: a fixed level coloured most of both lungs).
TOP_FRACTION = 0.15
#: The film in the picture: at the source's resolution, at most this many rows (configurable for
#: the Secondary Capture), and small films enlarged to at least MIN_ROWS so the legend reads.
MAX_ROWS = 2048
MIN_ROWS = 768
#: The heat map is computed at most this many pixels on its long side, then enlarged to the film.
HEAT_SIDE = 512


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
         lung_mask: np.ndarray | None = None, smooth: float = 0.015, work_side: int = HEAT_SIDE) -> np.ndarray:
    """The map shown to a reader, (H, W) in [0, 1]: placed on the film, smoothed (Gaussian, sigma a
    fraction of the film's size), and, given the lung fields, kept only inside them (soft edge).

    The map is made at most ``work_side`` pixels on its long side and enlarged (bilinear) to the
    film at the end: the smoothing is tens of pixels wide at full resolution, so the picture is
    the same, for about a twentieth of the time (the full-size Gaussian was 1 s of a 1.5 s SC)."""
    from scipy import ndimage

    h, w = film_shape
    scale = min(1.0, work_side / max(h, w))
    lh, lw = max(1, round(h * scale)), max(1, round(w * scale))
    c = place_cam(cam, (lh, lw), box)
    if smooth > 0:
        c = ndimage.gaussian_filter(c, sigma=max(1.0, smooth * max(lh, lw)))
    if lung_mask is not None:
        m = _resize(np.asarray(lung_mask, dtype=np.float32), (lh, lw))
        m = np.clip(ndimage.gaussian_filter(m, sigma=max(1.0, 0.01 * max(lh, lw))), 0.0, 1.0)
        c = c * m
    top = float(c.max())
    c = c / top if top > 0 else c
    if (lh, lw) != (h, w):
        c = np.clip(_resize(c, (h, w)), 0.0, 1.0)
    return c


def render_overlay(film: np.ndarray, cam: np.ndarray, threshold: float = OVERLAY_THRESHOLD,
                   max_alpha: float = OVERLAY_MAX_ALPHA, box: Sequence[float] | None = None,
                   lung_mask: np.ndarray | None = None, top_fraction: float | None = None) -> np.ndarray:
    """Grey film (H, W) in [0, 1] + Grad-CAM (h, w) in [0, 1] -> RGB uint8 (H, W, 3).

    Pixels below ``threshold`` (and, with ``lung_mask``, outside the lungs) keep the grey film;
    above it a colour is blended in with opacity rising from 0 at the threshold to ``max_alpha``.
    With ``top_fraction`` and the lung fields, the threshold rises so that at most that fraction
    of the lung area is coloured: the strongest part of the map, not every lung pixel."""
    from matplotlib import colormaps

    c = heat(film.shape, cam, box, lung_mask) if (box is not None or lung_mask is not None) \
        else place_cam(cam, film.shape)
    if top_fraction is not None and lung_mask is not None:
        inside = c[c > 0.05]
        if inside.size:
            threshold = max(threshold, float(np.quantile(inside, 1.0 - top_fraction)))
    threshold = min(threshold, 0.95)
    # grey everywhere, colour blended in only where the map is shown (a few per cent of the film):
    # the colour map and the blend on those pixels alone, not on three float planes of the whole film
    grey = np.clip(np.rint(np.clip(film, 0.0, 1.0) * np.float32(255.0)), 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    shown = c >= threshold
    if shown.any():
        # the shown part spans the colour scale from OVERLAY_THRESHOLD (weaker) to 1 (strongest)
        rel = np.clip((c[shown].astype(np.float64) - threshold) / max(1e-6, 1.0 - threshold), 0.0, 1.0)
        colour = colormaps[COLORMAP](OVERLAY_THRESHOLD + (1.0 - OVERLAY_THRESHOLD) * rel)[..., :3]
        alpha = (0.2 + rel * (max_alpha - 0.2))[..., None]
        g = np.clip(film[shown], 0.0, 1.0).astype(np.float64)[..., None]
        rgb[shown] = np.clip(np.rint((g * (1.0 - alpha) + colour * alpha) * 255.0), 0, 255).astype(np.uint8)
    return rgb


def _wrap(draw, text: str, font, width: int) -> list[str]:
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


def legend_size(h: int, w: int) -> int:
    """The legend's font size in pixels: about 2.2% of the film's height (narrow films: of 1.6x
    its width), at least 12 px, so it reads the same on a 512-row and a 2048-row picture."""
    return max(12, round(0.022 * min(h, 1.6 * w)))


def with_legend(rgb: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]],
                threshold: float = OVERLAY_THRESHOLD, colour_bar: bool = True) -> np.ndarray:
    """Add a legend strip below an RGB image: every line wrapped to fit (never cut off), then a
    colour bar from the threshold (transparent below) to 1 labelled "heat: low ... high"."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    h, w, _ = rgb.shape
    size = legend_size(h, w)
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
        left_label, right_label = "map: weaker", "strongest"
        x0 = size // 2 + int(draw.textlength(left_label, font=font)) + size // 2
        x1 = w - size - int(draw.textlength(right_label, font=font))
        if x1 - x0 >= 20:
            draw.text((size // 2, y), left_label, fill=(200, 200, 200), font=font)
            ramp = np.linspace(threshold, 1.0, x1 - x0)  # the part of the scale drawn on the film
            cols = (colormaps[COLORMAP](ramp)[:, :3] * 255).astype(np.uint8)
            bar = np.repeat(cols[None], bar_h, axis=0)
            canvas.paste(Image.fromarray(bar), (x0, y + (line_h - bar_h) // 2))
            draw.text((x1 + size // 2, y), right_label, fill=(200, 200, 200), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def fit(film: np.ndarray, max_rows: int = MAX_ROWS, min_rows: int = MIN_ROWS) -> np.ndarray:
    """A film (H, W) in [0, 1] at its own resolution, scaled down to at most ``max_rows`` rows (box
    filter) or up to at least ``min_rows`` (bilinear), keeping its aspect ratio."""
    from PIL import Image

    h, w = film.shape
    scale = min(1.0, max_rows / h) if h > max_rows else max(1.0, min_rows / h)
    if scale == 1.0:
        return film
    img = Image.fromarray(np.clip(film, 0.0, 1.0).astype(np.float32), mode="F")
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _is_normal(label: str) -> bool:
    from cxr_node.model.policy import NORMAL_NAMES

    return label.strip().lower() in NORMAL_NAMES


def flag_label(prediction, thresholds: dict[str, float] | None = None) -> str | None:
    """The class that raised the flag: for an urgent or review call the non-normal class furthest
    above its operating point (or the top class when it is not normal); None for a routine call."""
    if getattr(prediction, "priority", "routine") == "routine":
        return None
    p = dict(zip(prediction.labels, prediction.probabilities))
    above = [(p[n] - t, n) for n, t in (thresholds or {}).items() if n in p and not _is_normal(n) and p[n] >= t]
    if above:
        return max(above)[1]
    return None if _is_normal(prediction.top_label) else prediction.top_label


def legend_lines(prediction, model_name: str, model_version: str, calibration: str | None = None,
                 thresholds: dict[str, float] | None = None, heat_label: str | None = None, call=None
                 ) -> list[tuple[str, tuple[int, int, int]]]:
    """The legend: the notice, the call with the operating point it was compared with (``call``, a
    :class:`cxr_node.encode.wording.Call`: "URGENT: abnormal 87% (operating point 40%); pattern most
    like COVID-19", and "operating point not yet calibrated at this site" when so), every class as a
    pattern, what the map shows (or that there is none) and the model."""
    from cxr_node.encode import wording

    flag = str(getattr(prediction, "priority", "") or "").upper()
    thresholds = thresholds or {}
    label = _map_for(prediction, thresholds, call)
    p = dict(zip(prediction.labels, prediction.probabilities))
    pct = wording.percent
    if call is not None:
        head = wording.headline(call)
    elif label is not None and label in thresholds:
        head = f"{flag}: {label} {pct(p[label], 2)}, above the operating point of {pct(thresholds[label], 2)}"
    elif label is not None:
        head = f"{flag}: top class {label} {pct(p[label], 2)}"
    else:
        head = f"{flag}: top class {prediction.top_label} {pct(prediction.top_probability, 2)}; no finding flagged"
    shown = thresholds  # for a call on p(abnormal): only the patterns a site lets raise the flag
    probs = ("patterns: " if call is not None and call.is_abnormality else "") + "  ".join(
        f"{wording.display(n) if call is not None else n} {pct(v, 2)}"
        + (f" (op. {pct(shown[n], 2)})" if n in shown else "")
        for n, v in zip(prediction.labels, prediction.probabilities))
    name = wording.display if call is not None else str
    if heat_label is not None:
        map_line = (f"map: where the model looked for {name(heat_label)} (Grad-CAM, strongest {TOP_FRACTION:.0%} "
                    "of the lungs), not a lesion outline")
    elif label is None:
        map_line = "no map: nothing flagged"
    else:
        map_line = (f"no map: the model's map was made for {name(prediction.cam_label or prediction.top_label)}, "
                    f"not {name(label)}")
    model = f"model {model_version}" + (f" ({model_name})" if model_name and model_name not in model_version else "")
    lines = [("NOT FOR DIAGNOSTIC USE - research triage, an AI estimate", (255, 210, 0)), (head, (255, 255, 255))]
    if call is not None and call.threshold is not None and not call.site_calibrated:
        lines.append((wording.NOT_CALIBRATED, (255, 210, 0)))
    return lines + [
        (probs, (200, 200, 200)),
        (map_line, (200, 200, 200)),
        (model + (f" - {calibration}" if calibration else ""), (200, 200, 200)),
    ]


def _map_for(prediction, thresholds: dict[str, float], call=None) -> str | None:
    """The class whose map is shown: the flagging class (:func:`flag_label`); for a call on
    p(abnormal) the pattern the film looks most like, unless the call is routine."""
    if call is not None and call.is_abnormality:
        return None if call.priority == "routine" else call.pattern
    return flag_label(prediction, thresholds)


def render_figure(film: np.ndarray, prediction, model_name: str, model_version: str,
                  box: Sequence[float] | None = None, lung_mask: np.ndarray | None = None,
                  max_side: int = MAX_ROWS, calibration: str | None = None,
                  thresholds: dict[str, float] | None = None, min_rows: int = MIN_ROWS, call=None) -> np.ndarray:
    """The whole picture, RGB uint8: the film (at most ``max_side`` rows, at least ``min_rows``),
    the heat map only for the finding that raised the flag (inside the lungs, strongest part
    only), and the legend with the operating point and, when a map is shown, its colour scale.
    ``call`` (:func:`cxr_node.encode.wording.call_for`) words the headline."""
    if prediction.cam is None:
        raise ValueError("the prediction has no Grad-CAM map (predict with explain=True)")
    film = fit(film, max_side, min_rows)
    label = _map_for(prediction, thresholds or {}, call)
    heat_label = label if label is not None and label == (prediction.cam_label or prediction.top_label) else None
    if heat_label is not None:
        rgb = render_overlay(film, prediction.cam, box=box, lung_mask=lung_mask,
                             top_fraction=TOP_FRACTION if lung_mask is not None else None)
    else:
        rgb = np.repeat(np.clip(np.rint(film * 255.0), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    lines = legend_lines(prediction, model_name, model_version, calibration, thresholds, heat_label, call)
    return with_legend(rgb, lines, colour_bar=heat_label is not None)
