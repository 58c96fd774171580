"""The Grad-CAM overlay: grey film, heat map only where it matters. Used by the offline
``triage`` command's PNGs and by the Secondary Capture sent to the PACS, so both look alike."""

from __future__ import annotations

import numpy as np

#: Heat below this (Grad-CAM is normalised to [0, 1] per image) is left transparent.
OVERLAY_THRESHOLD = 0.35
OVERLAY_MAX_ALPHA = 0.6


def render_overlay(film: np.ndarray, cam: np.ndarray, threshold: float = OVERLAY_THRESHOLD,
                   max_alpha: float = OVERLAY_MAX_ALPHA) -> np.ndarray:
    """Grey film (H, W) in [0, 1] + Grad-CAM (h, w) in [0, 1] -> RGB uint8 (H, W, 3).

    The map is resized to the film (the model saw the film squashed to a square, so a plain resize
    puts it back); pixels below ``threshold`` keep the grey film, above it a 'jet' colour is blended
    in with opacity rising from 0 at the threshold to ``max_alpha`` at 1.
    """
    import torch
    import torch.nn.functional as F
    from matplotlib import colormaps

    h, w = film.shape
    c = F.interpolate(torch.tensor(np.array(cam, dtype=np.float32))[None, None], size=(h, w),
                      mode="bilinear", align_corners=False)[0, 0].numpy()
    c = np.clip(c, 0.0, 1.0)
    grey = np.repeat(np.clip(film, 0.0, 1.0)[..., None], 3, axis=2)
    colour = colormaps["jet"](c)[..., :3]
    alpha = np.where(c >= threshold, (c - threshold) / max(1e-6, 1.0 - threshold) * max_alpha, 0.0)[..., None]
    rgb = grey * (1.0 - alpha) + colour * alpha
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
