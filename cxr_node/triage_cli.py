"""``cxr-node triage FILE...``: offline triage of DICOM, PNG or JPEG files.

Per file: class probabilities, top class, urgent flag, priority and model version; with
``--overlay-dir`` a PNG of the film with the Grad-CAM heat map blended over it. A file that
cannot be used gets an error line (on stderr, and in the output) naming the rule it broke; the
other files are still processed and the exit status is 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cxr_node.errors import CxrNodeError, PreprocessError

log = logging.getLogger(__name__)

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


def _overlay_path(out_dir: Path, src: Path, used: set[str]) -> Path:
    stem = src.stem or "image"
    name = f"{stem}.gradcam.png"
    n = 2
    while name in used:
        name = f"{stem}-{n}.gradcam.png"
        n += 1
    used.add(name)
    return out_dir / name


def run_triage(settings: Any, args: Any, out: TextIO) -> int:
    """Triage ``args.files``; write a table or JSON to ``out``. Returns 0, or 1 if any file failed."""
    from PIL import Image

    from cxr_node.infer import Predictor

    ckpt = Path(args.checkpoint) if getattr(args, "checkpoint", None) else Path(settings.model.checkpoint)
    device = getattr(args, "device", None) or settings.model.device
    predictor = Predictor(ckpt, device=device)  # CheckpointError -> the CLI reports it, exit 1
    overlay_dir = Path(args.overlay_dir) if getattr(args, "overlay_dir", None) else None
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    fmt = getattr(args, "format", "table") or "table"

    rows: list[dict[str, Any]] = []
    failed = 0
    used: set[str] = set()
    for f in args.files:
        path = Path(f)
        row: dict[str, Any] = {"file": str(f)}
        try:
            x, film = predictor.preprocess_with_display(path)
            [pred] = predictor.predict([x], explain=overlay_dir is not None)
        except PreprocessError as e:
            failed += 1
            msg = str(e)
            if not msg.startswith(path.name) and not msg.startswith(str(path)):
                msg = f"{path.name}: {msg}"
            row["error"] = msg
            sys.stderr.write(f"cxr-node triage: {f}: cannot use this file: {e}\n")
            rows.append(row)
            continue
        row.update(pred.as_dict())
        if overlay_dir is not None and pred.cam is not None:
            op = _overlay_path(overlay_dir, path, used)
            try:
                Image.fromarray(render_overlay(film, pred.cam)).save(op)
                row["overlay"] = str(op)
            except OSError as e:
                raise CxrNodeError(f"cannot write overlay {op}: {e.strerror or e}") from e
        rows.append(row)
        log.info("triaged %s: %s %.3f urgent=%s", path.name, pred.top_label, pred.top_probability, pred.urgent)

    if fmt == "json":
        out.write(json.dumps({"model_version": predictor.version, "checkpoint": str(ckpt),
                              "labels": list(predictor.labels), "results": rows}, indent=2) + "\n")
    else:
        _write_table(out, rows, predictor.labels, predictor.version)
    return 1 if failed else 0


def _write_table(out: TextIO, rows: list[dict[str, Any]], labels: tuple[str, ...], version: str) -> None:
    heads = ["file", *labels, "top", "urgent", "priority", "model"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["file"], f"ERROR: {r['error']}"])
            continue
        probs = r["probabilities"]
        line = [r["file"], *(f"{probs[n]:.3f}" for n in labels), r["top_label"],
                "URGENT" if r["urgent"] else "no", r["priority"], r["model_version"]]
        if "overlay" in r:
            line.append(r["overlay"])
        table.append(line)
    ok = [t for t in table if len(t) > 2]
    widths = [max([len(h)] + [len(t[i]) for t in ok if i < len(t)]) for i, h in enumerate(heads)]
    out.write("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip() + "\n")
    for t in table:
        if len(t) == 2:
            out.write(f"{t[0].ljust(widths[0])}  {t[1]}\n")
        else:
            out.write("  ".join(c.ljust(w) for c, w in zip(t, widths + [0])).rstrip() + "\n")
