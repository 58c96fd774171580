"""The encode stage alone: what one full-resolution Grad-CAM Secondary Capture costs, per step.

Loads the bundled model, prepares the real CR chest film RG1_UNCR (pydicom-data, 1955x1841) and
predicts it once, then times, over ``--rounds`` repetitions: the heat map (place, smooth, mask),
the overlay (colour map, blend), the legend (text, colour bar), the whole picture
(``render_figure``), ``build_sc`` (picture + highdicom) and the Part 10 encoding. The first
``build_sc`` in a fresh process is reported apart (imports: scipy, matplotlib, PIL fonts,
highdicom). Torch and the array code run on ``--threads`` threads (2: the CI machine's cores).

    .venv/bin/python bench/encode.py [--rounds 5] [--threads 2] [--png OUT.png]
                                     [--baseline DIR] [--compare A.png B.png]

``--baseline DIR`` runs the same measurement, in the same go, with the cxr-node code checked out
in DIR (``git archive REV | tar -x -C DIR``), and prints both and their ratio; with ``--png`` each
tree's picture is saved (the baseline's next to it, ``*-baseline.png``) and the two compared
pixel by pixel. ``--compare`` compares two saved pictures only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(rounds: int, png: Path | None) -> dict:
    import numpy as np
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    import cxr_node
    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.model.infer import Predictor
    from cxr_node.model.lungs import LungSegmenter
    from cxr_node.model.preprocess import prepare

    models = Path(cxr_node.__file__).parent / "models"
    predictor = Predictor(models / "cxr-densenet121.pt", device="cpu", ood_reference=models / "cxr-densenet121.ood.pt")
    segmenter = LungSegmenter(models / "lung-unet.pt", device=predictor.device)
    identity = ModelIdentity.from_meta(predictor.meta)
    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    pr = prepare(ds, predictor.params, segmenter)
    finding = predictor.policy.apply(list(predictor.predict([pr.x], explain=True))[0])
    film, mask = pr.film, pr.lungs.mask

    from cxr_node.encode import sc as sc_module

    t0 = time.perf_counter()
    sc_module.build_sc(ds, film, finding, identity, instance_number=1, box=pr.box, lung_mask=mask)
    first = time.perf_counter() - t0

    from cxr_node.encode import overlay

    steps: dict[str, list[float]] = {k: [] for k in ("heat", "overlay", "legend", "render_figure", "build_sc",
                                                     "encode_part10")}
    for _ in range(rounds):
        t = time.perf_counter()
        overlay.heat(film.shape, finding.cam, pr.box, mask)
        steps["heat"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rgb = overlay.render_overlay(film, finding.cam, box=pr.box, lung_mask=mask, top_fraction=overlay.TOP_FRACTION)
        steps["overlay"].append(time.perf_counter() - t)
        t = time.perf_counter()
        overlay.with_legend(rgb, [("NOT FOR DIAGNOSTIC USE - a legend line to time", (255, 210, 0))] * 5)
        steps["legend"].append(time.perf_counter() - t)
        t = time.perf_counter()
        picture = sc_module.render(film, finding, identity, box=pr.box, lung_mask=mask)
        steps["render_figure"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sc = sc_module.build_sc(ds, film, finding, identity, instance_number=1, box=pr.box, lung_mask=mask)
        steps["build_sc"].append(time.perf_counter() - t)
        t = time.perf_counter()
        buf = io.BytesIO()
        sc.save_as(buf, enforce_file_format=True)
        steps["encode_part10"].append(time.perf_counter() - t)
    if png is not None:
        from PIL import Image

        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(picture)).save(png)
    return {"code": str(Path(cxr_node.__file__).parent.parent), "first_build_sc": first,
            "film": list(film.shape), "picture": list(picture.shape), "sc_bytes": len(buf.getvalue()),
            "priority": finding.priority, "median": {k: statistics.median(v) for k, v in steps.items()}}


def compare(a: Path, b: Path) -> dict:
    """How far two pictures differ, per pixel and channel (0-255)."""
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return {"same_size": False, "a": list(x.shape), "b": list(y.shape)}
    d = np.abs(x - y).max(axis=2)
    return {"same_size": True, "shape": list(x.shape), "max_diff": int(d.max()), "mean_diff": float(d.mean()),
            "pixels_over_8": float((d > 8).mean()), "pixels_over_2": float((d > 2).mean()),
            "pixels_equal": float((d == 0).mean())}


def run_tree(tree: Path, rounds: int, threads: int, png: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--rounds", str(rounds)]
    if png is not None:
        cmd += ["--png", str(png)]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"measurement in {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--compare", type=Path, nargs=2, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        print(json.dumps(compare(*args.compare), indent=1))
        return 0
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(measure(args.rounds, args.png)))
        return 0
    trees = [("this tree", REPO, args.png)]
    if args.baseline:
        base_png = args.png.with_name(args.png.stem + "-baseline.png") if args.png else None
        trees.append(("baseline", args.baseline.resolve(), base_png))
    out = {name: run_tree(tree, args.rounds, args.threads, png) for name, tree, png in trees}
    import platform

    print(f"encode stage, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {platform.node()} "
          f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}), {args.threads} threads, "
          f"median of {args.rounds}; film {out['this tree']['film']} -> picture {out['this tree']['picture']}")
    names = list(out)
    print(f"  {'step':16s}" + "".join(f"{n:>14s}" for n in names) + ("   ratio" if len(names) > 1 else ""))
    for key in list(out["this tree"]["median"]) + ["first_build_sc"]:
        vals = [out[n]["median"][key] if key in out[n]["median"] else out[n][key] for n in names]
        ratio = f"   {vals[0] / vals[1]:.2f}" if len(vals) > 1 and vals[1] else ""
        print(f"  {key:16s}" + "".join(f"{v:13.3f}s" for v in vals) + ratio)
    if args.png and args.baseline:
        print("  pictures:", json.dumps(compare(args.png, trees[1][2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
