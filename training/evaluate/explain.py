"""How much of the Grad-CAM heat falls inside the lungs, on films with drawn lung masks.

    python -m training.evaluate.explain --checkpoint CK --data DIR [--split-file runs/lung-unet/split.json]
        [--layers class_layers.relu features.denseblock3] --out training/results/cam-in-lung

For each film with a mask (``manifest.csv`` column ``lung_mask``; films the lung segmenter trained
on are left out when its split is given), the fraction of the positive Grad-CAM mass that lies
inside the drawn lung mask, per target layer: the raw map placed on the film, and the map as a
reader sees it (smoothed and kept inside the segmenter's lung fields, :func:`cxr_node.encode.overlay.heat`).
Writes ``cam_in_lung.json`` and before/after example overlays.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate.explain", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split-file", help="the lung segmenter's split.json: its training films are left out")
    ap.add_argument("--layers", nargs="+", default=["class_layers.relu", "features.denseblock3"])
    ap.add_argument("--max-films", type=int, default=120)
    ap.add_argument("--out", required=True)
    ap.add_argument("--figure", help="also write before/after pictures (with legend) of this film to OUT")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)

    from PIL import Image
    from tqdm import tqdm

    from cxr_node.encode.overlay import heat, place_cam, render_overlay
    from cxr_node.model.infer import Predictor
    from cxr_node.model.lungs import shared_segmenter
    from cxr_node.model.preprocess import prepare
    from training.evaluate.metrics import bootstrap_mean_ci

    root, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lung_mask")]
    if a.split_file:
        assign = json.loads(Path(a.split_file).read_text())["assign"]
        rows = [r for r in rows if assign.get(r["path"]) != "train"]
    rows = rows[: a.max_films]
    pred, seg = Predictor(a.checkpoint), shared_segmenter()
    res: dict[str, dict[str, list[float]]] = {layer: {"raw": [], "shown": []} for layer in a.layers}
    for i, r in enumerate(tqdm(rows, desc="films", unit="film")):
        pr = prepare(root / r["path"], pred.params, seg)
        gt = np.asarray(Image.open(root / r["lung_mask"]).convert("L").resize(pr.display.shape[::-1]),
                        dtype=np.float32) >= 128
        for layer in a.layers:
            pred.target_layer = layer
            [p] = pred.predict([pr.x])
            raw = place_cam(p.cam, pr.display.shape, pr.box)
            shown = heat(pr.display.shape, p.cam, pr.box, pr.lungs.mask if pr.lungs.box else None)
            for kind, c in (("raw", raw), ("shown", shown)):
                res[layer][kind].append(float((c * gt).sum() / max(c.sum(), 1e-9)))
            if i < 3:
                rgb = render_overlay(pr.display, p.cam, box=pr.box,
                                     lung_mask=pr.lungs.mask if pr.lungs.box else None) \
                    if layer != a.layers[0] else render_overlay(pr.display, p.cam)
                Image.fromarray(rgb).save(out / f"example-{i}-{layer.replace('.', '_')}.png")
    if a.figure:
        from cxr_node.encode.overlay import legend_lines, with_legend

        pr = prepare(a.figure, pred.params, seg)
        for layer, name, masked in ((a.layers[0], "before", False), (a.layers[-1], "after", True)):
            pred.target_layer = layer
            f = pred.policy.apply(pred.predict([pr.x])[0])
            rgb = render_overlay(pr.display, f.cam, box=pr.box, lung_mask=pr.lungs.mask) if masked \
                else render_overlay(pr.display, f.cam)
            lines = legend_lines(f, "cxr-node", pred.version)
            if not masked:
                lines[-1] = (f"heat map: Grad-CAM for {f.cam_label} at {layer} (before)", lines[-1][1])
            Image.fromarray(with_legend(rgb, lines, colour_bar=masked)).save(out / f"overlay-{name}.png")
    summary = {"checkpoint_version": pred.version, "n": len(rows), "layers": {}}
    for layer, kinds in res.items():
        summary["layers"][layer] = {kind: {"mean": float(np.mean(v)), "ci95": bootstrap_mean_ci(np.array(v))}
                                    for kind, v in kinds.items()}
    (out / "cam_in_lung.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
