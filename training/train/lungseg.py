"""Train the lung-field segmenter (a small MONAI UNet) and export it next to the classifier.

    python -m training.train.lungseg --data DIR --out runs/lung-unet [--epochs 80] [--size 128]
    python -m training.train.lungseg --data DIR --out runs/lung-unet --evaluate-only   # Dice on test, once

``DIR`` is a folder with ``manifest.csv`` whose rows have ``path``, ``patient_id``, ``near_dup_group``
and ``lung_mask`` (a PNG, 255 = lung, same size as the image; rows without a mask are ignored), as in
the ieee8023 covid-chestxray-dataset export. The split is grouped by patient and near-duplicate
cluster (70/15/15, seed 0) and saved in ``OUT/split.json``; the epoch with the best validation Dice
is kept; the test split is evaluated once with ``--evaluate-only`` and a bootstrap interval.

Films are prepared by the shared chain (:func:`cxr_node.model.preprocess.display_and_contrast`: LUTs,
area downscale, CLAHE), exactly what serving gives the segmenter. Hard augmentation (the masks were
drawn on COVID films of one collection): affine (rotation, scale, shift, so also crops and zoom-out),
horizontal flips (the label "lung" is the same on both sides), gamma, contrast, blur, sharpen and
noise. Generated negatives (photographs and patterns from scikit-image, noise, text pages, with
empty masks) teach the network that not every image has lungs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxr_node.model.checkpoint import atomic_torch_save, make_checkpoint
from cxr_node.model.lungs import ARCH, DEFAULT_PLAUSIBILITY, KIND, analyse_mask, build_segmenter, segmenter_input
from training.evaluate.metrics import bootstrap_mean_ci

log = logging.getLogger("training.train.lungseg")

CHANNELS = (8, 16, 32, 64, 128)
STRIDES = (2, 2, 2, 2)
RES_UNITS = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train.lungseg", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with manifest.csv, images and lung masks")
    p.add_argument("--out", required=True, help="run folder (split, checkpoints, history, results)")
    p.add_argument("--size", type=int, default=128, help="segmenter input size in px (default 128)")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--negatives", type=int, default=60, help="generated negative images (empty masks) in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate OUT/best.pt on the test split (once)")
    p.add_argument("--export", help="write the fp16 bundled checkpoint here (from OUT/best.pt)")
    return p


# --------------------------------------------------------------------------- data


def read_rows(data: Path) -> list[dict]:
    with open(data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lung_mask")]
    if not rows:
        raise SystemExit(f"{data}/manifest.csv has no rows with a lung_mask")
    return rows


def grouped_split(rows: Sequence[dict], seed: int, fractions=(0.70, 0.15, 0.15)) -> dict[str, str]:
    """path -> train/val/test, grouped by patient and near-duplicate cluster (union of both)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        keys = [f"p:{r['patient_id'] or r['path']}"] + ([f"d:{r['near_dup_group']}"] if r.get("near_dup_group") else [])
        for k in keys[1:]:
            parent[find(keys[0])] = find(k)
        find(keys[0])
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(find(f"p:{r['patient_id'] or r['path']}"), []).append(r["path"])
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    total = len(rows)
    out, acc = {}, 0
    for g in names:
        split = "train" if acc < fractions[0] * total else "val" if acc < (fractions[0] + fractions[1]) * total else "test"
        for p in groups[g]:
            out[p] = split
        acc += len(groups[g])
    return out


def prepare(path: Path, size: int) -> np.ndarray:
    """A film -> what the segmenter sees before z-scoring: (size, size) float32 in [0, 1]."""
    from cxr_node.model.preprocess import DEFAULT_PARAMS, display_and_contrast

    _, contrast = display_and_contrast(path, DEFAULT_PARAMS)
    t = torch.as_tensor(contrast)[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def prepare_mask(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    m = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    t = torch.as_tensor(m)[None, None]
    return (torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0, 0].numpy() >= 0.5).astype(np.uint8)


def text_page(rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (size * 2, size * 2), int(rng.integers(200, 256)))
    d = ImageDraw.Draw(img)
    y = int(rng.integers(2, 12))
    while y < size * 2 - 8:
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(2, 9)))
                         for _ in range(int(rng.integers(3, 9))))
        d.text((int(rng.integers(2, 20)), y), words, fill=int(rng.integers(0, 80)))
        y += int(rng.integers(9, 16))
    a = np.asarray(img.resize((size, size)), dtype=np.float32) / 255.0
    return a if rng.random() < 0.7 else 1.0 - a


def negatives(n: int, size: int, seed: int) -> np.ndarray:
    """Generated images with no lungs: some scikit-image samples, noise, gradients, text pages."""
    from skimage import color, data, exposure, transform

    rng = np.random.default_rng(seed + 1000)
    samples = []
    for name in ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "astronaut", "coffee"):
        a = getattr(data, name)()
        if a.ndim == 3:
            a = color.rgb2gray(a[..., :3])
        a = a.astype(np.float32)
        a = (a - a.min()) / (np.ptp(a) + 1e-6)
        samples.append(transform.resize(a, (size, size), anti_aliasing=True).astype(np.float32))
    out = []
    for i in range(n):
        k = i % 4
        if k == 0:
            a = samples[int(rng.integers(len(samples)))]
        elif k == 1:
            a = rng.random((size, size)).astype(np.float32)
            if rng.random() < 0.5:
                import scipy.ndimage as ndi
                a = ndi.gaussian_filter(a, float(rng.uniform(1, 6)))
        elif k == 2:
            yy, xx = np.mgrid[0:size, 0:size] / size
            a = (np.sin(xx * rng.uniform(2, 20)) * np.cos(yy * rng.uniform(2, 20)) + 1) / 2
        else:
            a = text_page(rng, size)
        a = exposure.equalize_adapthist(np.clip(a, 0, 1), clip_limit=0.01).astype(np.float32)
        out.append(a)
    return np.stack(out)


def load_cache(data: Path, rows: Sequence[dict], size: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    if cache.is_file():
        z = np.load(cache)
        return z["x"], z["y"]
    from tqdm import tqdm

    xs, ys = [], []
    for r in tqdm(rows, desc="preparing films", unit="film"):
        xs.append(prepare(data / r["path"], size))
        ys.append(prepare_mask(data / r["lung_mask"], size))
    x = (np.stack(xs) * 255).round().astype(np.uint8)
    y = np.stack(ys)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=y)
    return x, y


# --------------------------------------------------------------------------- augmentation


def augmenter(seed: int):
    from monai import transforms as T

    keys = ("image", "label")
    aug = T.Compose([
        T.RandAffined(keys, prob=0.9, rotate_range=math.radians(15), scale_range=(0.3, 0.3),
                      translate_range=(0.12, 0.12), mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.RandFlipd(keys, prob=0.5, spatial_axis=1),
        T.RandAdjustContrastd("image", prob=0.5, gamma=(0.5, 2.0)),
        T.RandScaleIntensityd("image", prob=0.4, factors=0.3),
        T.RandGaussianSmoothd("image", prob=0.25, sigma_x=(0.3, 1.5), sigma_y=(0.3, 1.5)),
        T.RandGaussianSharpend("image", prob=0.15),
        T.RandGaussianNoised("image", prob=0.3, std=0.05),
    ])
    aug.set_random_state(seed)
    return aug


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    inter = float((pred & true).sum())
    s = float(pred.sum() + true.sum())
    return 1.0 if s == 0 else 2 * inter / s


def predict(model, x: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            t = torch.cat([segmenter_input(a.astype(np.float32) / 255.0, size) for a in x[i:i + batch]])
            out.append(torch.sigmoid(model(t))[:, 0].numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------- train / evaluate


def train(args: argparse.Namespace) -> dict:
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(data)
    split_path = out / "split.json"
    if split_path.is_file():
        assign = json.loads(split_path.read_text())["assign"]
    else:
        assign = grouped_split(rows, args.seed)
        split_path.write_text(json.dumps({"seed": args.seed, "assign": assign}, indent=0))
    x, y = load_cache(data, rows, args.size, out / f"cache-{args.size}.npz")
    idx = {s: np.array([i for i, r in enumerate(rows) if assign[r["path"]] == s]) for s in ("train", "val", "test")}
    log.info("films: train %d, val %d, test %d", *(len(idx[s]) for s in ("train", "val", "test")))
    neg = (negatives(args.negatives, args.size, args.seed) * 255).round().astype(np.uint8)
    tx = np.concatenate([x[idx["train"]], neg])
    ty = np.concatenate([y[idx["train"]], np.zeros_like(neg)])

    model = build_segmenter(CHANNELS, STRIDES, RES_UNITS)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs
                                                * math.ceil(len(tx) / args.batch_size))
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    history, start, best = [], 0, -1.0
    last = out / "last.pt"
    if args.resume and last.is_file():
        st = torch.load(last, weights_only=True)
        model.load_state_dict(st["model"]), opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"])
        start, best, history = st["epoch"] + 1, st["best"], json.loads(st["history"])
        log.info("resumed at epoch %d (best val Dice %.4f)", start, best)
    aug = augmenter(args.seed + start)
    rng = np.random.default_rng(args.seed + start)
    for epoch in range(start, args.epochs):
        model.train()
        t0, losses = time.time(), []
        order = rng.permutation(len(tx))
        for b in tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            sel = order[b:b + args.batch_size]
            ims, lbs = [], []
            for i in sel:
                d = aug({"image": torch.as_tensor(tx[i][None], dtype=torch.float32) / 255.0,
                         "label": torch.as_tensor(ty[i][None], dtype=torch.float32)})
                ims.append(segmenter_input(torch.clamp(torch.as_tensor(d["image"]), 0, 1), args.size))
                lbs.append(torch.as_tensor(d["label"])[None])
            xb, yb = torch.cat(ims), torch.cat(lbs).float()
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss))
        model.eval()
        pv = predict(model, x[idx["val"]], args.size) >= 0.5
        vd = float(np.mean([dice(p, t.astype(bool)) for p, t in zip(pv, y[idx["val"]])]))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": vd,
                        "seconds": round(time.time() - t0, 1)})
        log.info("epoch %d: loss %.4f, val Dice %.4f (%.0f s)", epoch + 1, history[-1]["loss"], vd, time.time() - t0)
        if vd > best:
            best = vd
            atomic_torch_save({"model": model.state_dict(), "epoch": epoch, "val_dice": vd}, out / "best.pt")
        atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "epoch": epoch, "best": best, "history": json.dumps(history)}, last)
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return {"best_val_dice": best}


def manifest_digest(rows: Sequence[dict], assign: dict) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["path"]):
        h.update(f"{r['path']}\t{r['lung_mask']}\t{assign[r['path']]}\n".encode())
    return h.hexdigest()


def evaluate(args: argparse.Namespace, split: str = "test") -> dict:
    data, out = Path(args.data), Path(args.out)
    rows = read_rows(data)
    assign = json.loads((out / "split.json").read_text())["assign"]
    x, y = load_cache(data, rows, args.size, out / f"cache-{args.size}.npz")
    model = build_segmenter(CHANNELS, STRIDES, RES_UNITS)
    st = torch.load(out / "best.pt", weights_only=True)
    model.load_state_dict(st["model"])
    model.eval()
    res = {}
    for s in dict.fromkeys(("val", split)):
        sel = np.array([i for i, r in enumerate(rows) if assign[r["path"]] == s])
        prob = predict(model, x[sel], args.size)
        d = np.array([dice(p >= 0.5, t.astype(bool)) for p, t in zip(prob, y[sel])])
        fields = [analyse_mask(p) for p in prob]
        res[s] = {"n": int(len(sel)), "dice_mean": float(d.mean()), "dice_ci95": bootstrap_mean_ci(d),
                  "dice_median": float(np.median(d)), "dice_min": float(d.min()),
                  "plausible": int(sum(f.plausible for f in fields)),
                  "refusal_reasons": sorted({f.reason for f in fields if f.reason})}
    res["epoch"] = int(st["epoch"]) + 1
    res["data_manifest_sha256"] = manifest_digest(rows, assign)
    (out / f"results-{split}.json").write_text(json.dumps(res, indent=1))
    return res


def export(args: argparse.Namespace) -> Path:
    """The bundled fp16 checkpoint from OUT/best.pt, with the figures of the last evaluation
    (``--evaluate-only``: validation and test; else validation only)."""
    out = Path(args.out)
    done = out / "results-test.json"
    res = json.loads(done.read_text()) if done.is_file() else evaluate(args, split="val")
    test = res.get("test", {})
    st = torch.load(out / "best.pt", weights_only=True)
    meta = {"kind": KIND, "arch": ARCH, "channels": list(CHANNELS), "strides": list(STRIDES),
            "num_res_units": RES_UNITS, "input_size": args.size, "threshold": 0.5,
            "plausibility": dict(DEFAULT_PLAUSIBILITY), "version": f"lung-unet-{args.size}-e{res['epoch']}",
            "metrics": {"val_dice": res["val"]["dice_mean"], "test_dice": test.get("dice_mean"),
                        "test_dice_ci95": test.get("dice_ci95"), "test_n": test.get("n")},
            "data_manifest_sha256": res["data_manifest_sha256"],
            "trained_on": "ieee8023 covid-chestxray-dataset lung masks (v7labs), grouped by patient"}
    path = atomic_torch_save(make_checkpoint(st["model"], meta, fp16=True), args.export)
    log.info("exported %s (%.1f kB)", path, path.stat().st_size / 1024)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.evaluate_only:
        print(json.dumps(evaluate(args), indent=1))
    elif not args.export:
        print(json.dumps(train(args), indent=1))
    if args.export:
        export(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
