"""Model benchmark: per-image latency (decode + preprocess + forward + Grad-CAM) and training images/s.

    .venv/bin/python bench/model.py [--checkpoint PATH] [--repeats 10] [--threads 2] [--json out.json]

Latency is measured on the real CR films RG1_UNCR.dcm (uncompressed) and RG1_J2KR.dcm (JPEG 2000
lossless) from pydicom-data, one film at a time (batch 1), after one warm-up; each stage is timed
separately (``lungs`` is the lung-field segmenter on the CLAHE'd film, ``ood_score`` the
out-of-domain score on the features, both added by the eligibility rules; ``forward`` alone is
shown for reference; ``predict_gradcam`` is
``Predictor.predict(explain=True)``: forward, softmax, Grad-CAM forward + backward) and
the total (decode + preprocess + predict_gradcam) is reported as p50/p95. Training throughput runs ``--train-steps``
AdamW steps of the checkpoint's architecture at its input size on cached uint8 films with the
training augmentation (the loop of training/train/loop.py), after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v) * 1000.0, q))


def latency(checkpoint: Path, repeats: int) -> dict:
    import pydicom
    import torch
    from pydicom.data import get_testdata_file

    from cxr_node.model.infer import Predictor
    from cxr_node.model.lungs import LungSegmenter
    from cxr_node.model.preprocess import CLAHE, AreaDownscale, NormalizeIntensity, ResizeSquare
    from cxr_node.model.radiograph import dicom_to_float

    pred = Predictor(checkpoint, device="cpu")
    seg = LungSegmenter()
    p = pred.params
    down, clahe = AreaDownscale(p["downscale_max"]), CLAHE(p["clahe_clip_limit"], p["clahe_kernel_fraction"], p["clahe_nbins"])
    resize, norm = ResizeSquare(p["input_size"]), NormalizeIntensity(p["normalize"])
    out = {}
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        path = get_testdata_file(name)
        stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "lungs": [], "forward": [], "ood_score": [],
                                          "predict_gradcam": [], "total": []}
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            ds = pydicom.dcmread(path)
            _ = ds.pixel_array  # decode
            t1 = time.perf_counter()
            c = clahe(down(dicom_to_float(ds, p["percentiles"], p["min_size"])[None]))
            x = norm(resize(c))
            t2 = time.perf_counter()
            seg.analyse(c)  # lung fields: the eligibility rule (and the crop, for a model trained with it)
            tl = time.perf_counter()
            with torch.inference_mode():
                pred.model(x[None])
            t3 = time.perf_counter()
            if pred.ood is not None:
                pred.ood.score(pred._features)
            to = time.perf_counter() - t3
            t3 = time.perf_counter()
            pred.predict([x], explain=True)  # forward + backward for Grad-CAM (+ softmax)
            t4 = time.perf_counter()
            if r == 0:
                continue  # warm-up
            stages["decode"].append(t1 - t0)
            stages["preprocess"].append(t2 - t1)
            stages["lungs"].append(tl - t2)
            stages["forward"].append(t3 - tl - to)
            stages["ood_score"].append(to)
            stages["predict_gradcam"].append(t4 - t3)
            stages["total"].append((tl - t0) + (t4 - t3))  # the standalone forward is not counted twice
        out[name] = {k: {"p50_ms": pct(v, 50), "p95_ms": pct(v, 95)} for k, v in stages.items()}
        out[name]["repeats"] = repeats
    return out


def train_throughput(checkpoint: Path, steps: int, batch: int) -> dict:
    import torch

    from cxr_node.model.checkpoint import build_model, read_checkpoint
    from training.train.sampling import CachedDataset

    meta = read_checkpoint(checkpoint)["meta"]
    s = int(meta["input_size"])
    rng = np.random.default_rng(0)
    n = batch * (steps + 1)
    cache = rng.integers(0, 256, size=(n, s, s), dtype=np.uint8)
    ds = CachedDataset(cache, range(n), rng.integers(0, len(meta["labels"]), n), meta["preprocess"], augment=True, seed=0)
    model = build_model(meta["arch"], len(meta["labels"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        items = [ds[i] for i in range(step * batch, (step + 1) * batch)]
        x = torch.stack([a for a, _ in items])
        y = torch.tensor([b for _, b in items])
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    return {"arch": meta["arch"], "input_size": s, "batch": batch, "steps": steps,
            "images_per_s": batch * steps / sum(times), "step_s_p50": float(np.median(times))}


def main(argv: list[str] | None = None) -> int:
    import torch

    from cxr_node.config import BUNDLED_CHECKPOINT

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "checkpoint": args.checkpoint, "latency": latency(Path(args.checkpoint), args.repeats),
           "training": train_throughput(Path(args.checkpoint), args.train_steps, args.batch_size)}
    text = json.dumps(res, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.stdout.write("\n| film | decode p50 | preprocess p50 | lungs p50 | OOD score p50 | forward p50 | "
                     "predict + Grad-CAM p50 | total p50 | total p95 | added by eligibility (lungs + OOD) / total |\n"
                     "|---|---|---|---|---|---|---|---|---|---|\n")
    for name, st in res["latency"].items():
        added = st['lungs']['p50_ms'] + st['ood_score']['p50_ms']
        sys.stdout.write(f"| {name} | {st['decode']['p50_ms']:.0f} ms | {st['preprocess']['p50_ms']:.0f} ms | "
                         f"{st['lungs']['p50_ms']:.0f} ms | {st['ood_score']['p50_ms']:.1f} ms | "
                         f"{st['forward']['p50_ms']:.0f} ms | {st['predict_gradcam']['p50_ms']:.0f} ms | "
                         f"{st['total']['p50_ms']:.0f} ms | {st['total']['p95_ms']:.0f} ms | "
                         f"{added:.0f} ms / {st['total']['p50_ms']:.0f} ms = {added / st['total']['p50_ms']:.2f} |\n")
    t = res["training"]
    sys.stdout.write(f"\ntraining: {t['arch']} {t['input_size']}px batch {t['batch']}: "
                     f"{t['images_per_s']:.1f} images/s ({t['step_s_p50']:.2f} s/step)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
