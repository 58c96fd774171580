"""Train a chest X-ray classifier: ``python -m training.train --data DIR_OR_MANIFEST --out RUN_DIR``.

Pipeline: read the dataset (folder-per-class tree, manifest CSV, or a merged manifest from
``python -m training.sources build``, whose split column is used) -> grouped stratified 70/15/15
split with a fixed seed (saved as RUN_DIR/split.csv + split.json) -> preprocess every film once
with ``cxr_node.model.preprocess.base_transform`` (parameters: ``--input-size`` and ``--preprocess
KEY=VALUE``) into a uint8 cache -> train with class-weighted cross-entropy (or ``--balance``
sampling), augmentation (``--augment v2|v3``), AdamW and ReduceLROnPlateau -> early stopping on
the validation macro AUC. Writes RUN_DIR/best.pt, RUN_DIR/last.pt (with optimizer state for
``--resume``), history.json and curves.png.

On CUDA: mixed precision (autocast + GradScaler) and channels_last. Under ``torchrun`` it uses
DistributedDataParallel (nccl on CUDA, gloo on CPU) with a DistributedSampler.

After training, run ``python -m training.calibrate`` (temperature + operating points on the
validation split) and ``python -m training.evaluate --split test`` once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.common import parse_preprocess, predict_logits

log = logging.getLogger("training.train")

DEFAULT_CRITICAL = "COVID"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description=textwrap.fill(
            "Train a chest X-ray classifier (MONAI DenseNet121 by default) on a folder-per-class tree or a "
            "manifest CSV: grouped stratified 70/15/15 split saved next to the checkpoints, films "
            "preprocessed once into a uint8 cache with cxr_node.model.preprocess, class-weighted cross-entropy, "
            "augmentation, AdamW + ReduceLROnPlateau, early stopping on the validation macro AUC. CUDA: "
            "mixed precision + channels_last. Works under torchrun (DDP).", 88),
        epilog="""examples:
  # the bundled model (CPU, about 10-15 min per epoch on 2 cores)
  python -m training.train --data /path/covid19-radiography/manifest.csv --out runs/densenet128 \\
      --input-size 128 --epochs 6 --threads 2
  # continue an interrupted run from RUN_DIR/last.pt
  python -m training.train --data ... --out runs/densenet128 --resume
  # GPU, mixed precision, 2 GPUs
  torchrun --nproc_per_node 2 -m training.train --data ... --out runs/gpu --device cuda --input-size 224

then: python -m training.calibrate --checkpoint RUN_DIR/best.pt --data ...
      python -m training.evaluate --checkpoint RUN_DIR/best.pt --data ... --split test --out RUN_DIR/test
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder-per-class directory, or a manifest CSV (path,label,...)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, split, history, curves")
    p.add_argument("--arch", default="densenet121",
                   choices=["densenet121", "resnet50", "efficientnet-b0", "efficientnet-b3"])
    p.add_argument("--input-size", type=int, default=224, help="model input side in px (default 224)")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=4, help="early stopping: epochs without val macro AUC gain")
    p.add_argument("--lr-patience", type=int, default=1, help="ReduceLROnPlateau patience (epochs)")
    p.add_argument("--seed", type=int, default=42, help="split, init, shuffling and augmentation seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); under CPU contention also set "
                   "OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--cache-dir", default=None, help="where the uint8 preprocessed cache lives (default RUN_DIR/cache)")
    p.add_argument("--film-pack", default=None, metavar="FILE", help="read preprocessed films from this pack (python -m training.pack) instead of the source images")
    p.add_argument("--critical", action="append", default=None,
                   help=f"critical class(es) for urgent flags, each with its own operating point (repeatable or "
                   f"comma-separated, e.g. COVID,Tuberculosis; default {DEFAULT_CRITICAL} if present). A named class "
                   "that the training films lack (a leave-source-out fold) is left out with a warning")
    p.add_argument("--augment", default="v2", choices=["v2", "v3", "v4", "none"],
                   help="augmentation recipe: v2 (rotation, zoom, window jitter, contrast, noise; the bundled "
                   "v2 model's), v3 (v2's plus gamma, blur/sharpen, JPEG re-compression, resolution drop, "
                   "affine, border and text-marker occlusion: training/augment.py), v4 (v3's with the "
                   "down-scale-and-up-scale of every class at probability 0.5: no resolution shortcut), none")
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--balance", default="none", choices=["none", "class", "source,class"],
                   help="none (default, as v2): uniform sampling, class-weighted loss; class: sample each class "
                   "equally often, plain loss; source,class: each class equally often and, within a class, each "
                   "source equally often (needs a manifest with a source column), plain loss")
    p.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cxr_node.model.preprocess parameter (VALUE is JSON, else a string), e.g. "
                   "--preprocess clahe_clip_limit=0.02; stored in the checkpoint, so serving applies it too")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (same labels, arch and input size) "
                   "with a fresh optimizer; pair it with --split-file to keep that run's split")
    p.add_argument("--split-file", default=None,
                   help="use this split.csv (e.g. an earlier run's) instead of drawing a new split, so the "
                   "test films stay the ones that run held out")
    p.add_argument("--schedule", default="plateau", choices=["plateau", "cosine"],
                   help="learning-rate schedule: ReduceLROnPlateau on val macro AUC (default), or cosine "
                   "annealing from --lr to 1%% of it over --epochs (suits fine-tuning)")
    p.add_argument("--version", dest="model_version", default=None,
                   help="model version string recorded in the checkpoint (default <arch>-<input>-<date>)")
    p.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)  # tests / smoke runs
    p.add_argument("--log-level", default="INFO")
    return p


# --------------------------------------------------------------------------- data


class CachedDataset:
    """Items from the uint8 cache: ([1,S,S] float tensor normalised, label index)."""

    def __init__(self, cache: np.ndarray, indices: Sequence[int], targets: Sequence[int], params: dict,
                 augment: bool | str, seed: int) -> None:
        from cxr_node.model.preprocess import normalize_transform

        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.norm = normalize_transform(params)
        recipe = "v2" if augment is True else augment
        self.aug = make_augment(recipe, int(params["input_size"])) if recipe and recipe != "none" else None
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        x = torch.from_numpy(self.cache[self.indices[i]].astype(np.float32) / 255.0)[None]
        if self.aug is not None:
            # deterministic per (seed, epoch, item): independent of worker count and resume point
            self.aug.set_random_state(seed=(self.seed * 1_000_003 + self.epoch * 100_003 + int(i)) % (2**32))
            x = self.aug(x)
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return self.norm(x).contiguous(), int(self.targets[i])


def make_augment(recipe: str = "v2", size: int = 128):
    """The augmentation for ``recipe``: ``v2`` is the bundled v2 model's (below); ``v3`` is
    :func:`training.augment.make_v3_augment`."""
    if recipe == "v3":
        from training.augment import make_v3_augment

        return make_v3_augment(size)
    if recipe == "v4":
        from training.augment import make_v4_augment

        return make_v4_augment(size)
    if recipe != "v2":
        raise ValueError(f"unknown augmentation recipe {recipe!r} (v2, v3, v4)")
    return make_v2_augment()


def make_v2_augment():
    """Small rotation, zoom, contrast/window and noise on a [0, 1] (1, S, S) image (MONAI Rand*)."""
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandGaussianNoise,
        RandRotate,
        RandZoom,
        ScaleIntensityRange,
    )

    from training.transforms import RandWindowJitter

    return Compose([
        RandRotate(range_x=math.radians(8), prob=0.5, padding_mode="border", keep_size=True),
        RandZoom(min_zoom=0.92, max_zoom=1.08, prob=0.5, padding_mode="edge", keep_size=True),
        RandWindowJitter(prob=0.4, max_shift=0.06, gamma_range=(0.85, 1.18)),
        RandAdjustContrast(prob=0.3, gamma=(0.85, 1.18)),
        RandGaussianNoise(prob=0.3, mean=0.0, std=0.015),
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ])


# --------------------------------------------------------------------------- helpers


def critical_classes(requested: Sequence[str] | None, labels: Sequence[str], warn: bool = True) -> list[str]:
    """The critical classes: ``--critical`` (repeatable, comma-separated) among ``labels``; a named
    class the films lack is left out with a warning (a leave-source-out fold without any of its
    films), none left is an error. Default: COVID when present, else the first label."""
    if not requested:
        if DEFAULT_CRITICAL in labels:
            return [DEFAULT_CRITICAL]
        if warn:
            log.warning("no %s class: the critical (urgent) class defaults to %r, the first label; pass --critical",
                        DEFAULT_CRITICAL, labels[0])
        return [labels[0]]
    names = list(dict.fromkeys(n.strip() for item in requested for n in item.split(",") if n.strip()))
    kept = [n for n in names if n in labels]
    if not kept:
        raise SystemExit(f"--critical {','.join(names)}: none is a label ({', '.join(labels)})")
    if warn and len(kept) < len(names):
        log.warning("critical class(es) %s have no training films here and are left out (labels: %s)",
                    ", ".join(n for n in names if n not in labels), ", ".join(labels))
    return kept


def sample_weights(labels: Sequence[str], sources: Sequence[str], mode: str) -> np.ndarray:
    """Per-film sampling weights summing to 1. ``class``: 1 / (K n_c). ``source,class``: each class
    gets 1/K and, within it, each of its S_c sources 1/S_c: 1 / (K S_c n_{s,c})."""
    labels, sources = list(labels), list(sources)
    n_c = Counter(labels)
    k = len(n_c)
    if mode == "class":
        w = np.array([1.0 / (k * n_c[c]) for c in labels])
    elif mode == "source,class":
        if not all(sources):
            raise SystemExit("--balance source,class needs a manifest with a source column "
                             "(python -m training.sources build); use --balance class")
        n_sc = Counter(zip(sources, labels))
        s_c = Counter(c for (_, c) in n_sc)
        w = np.array([1.0 / (k * s_c[c] * n_sc[(s, c)]) for s, c in zip(sources, labels)])
    else:
        raise ValueError(f"unknown balance mode {mode!r}")
    return w / w.sum()


class BalancedSampler:
    """Draws ``num_samples`` indices with replacement by ``weights`` from a generator seeded by
    (seed, epoch); under DDP each rank takes every ``world``-th draw of the same sequence."""

    def __init__(self, weights: np.ndarray, num_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        self.num_samples, self.seed, self.rank, self.world = int(num_samples), int(seed), int(rank), int(world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _draw(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        idx = torch.multinomial(torch.as_tensor(self.weights), self.num_samples, replacement=True, generator=g)
        return idx.tolist()[self.rank::self.world]

    def __iter__(self):
        return iter(self._draw())

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world))


def class_weights(targets: np.ndarray, k: int) -> np.ndarray:
    """Inverse class frequency, scaled so the weights average 1 over samples: N / (K * n_c)."""
    counts = np.bincount(targets, minlength=k).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"every class needs training images (counts {counts.tolist()})")
    return len(targets) / (k * counts)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax[0].plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(ep, [h["val_macro_auc"] for h in history], "o-", label="val macro AUC")
    ax[1].plot(ep, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


# --------------------------------------------------------------------------- main


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from monai.data import set_track_meta
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from cxr_node.model.checkpoint import (
        atomic_torch_save,
        build_model,
        make_checkpoint,
        read_checkpoint,
        resolve_device,
    )
    from training import data as D
    from training.metrics import macro_auc, softmax

    set_track_meta(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    device = resolve_device(args.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
    is_main = rank == 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    amp = device.type == "cuda"
    channels_last = device.type == "cuda"

    if getattr(args, "film_pack", None):
        D.use_pack(args.film_pack)
    records = D.read_dataset(args.data)
    labels = sorted({r.label for r in records})
    label_idx = {n: i for i, n in enumerate(labels)}
    criticals = critical_classes(args.critical, labels, warn=rank == 0)
    params = parse_preprocess(getattr(args, "preprocess", []) or [], args.input_size)
    augment = "none" if args.no_augment else getattr(args, "augment", "v2")
    balance = getattr(args, "balance", "none")

    split_csv = out / "split.csv"
    if args.resume and split_csv.is_file():
        assign = D.load_split(split_csv)
    elif args.split_file:
        assign = D.load_split(Path(args.split_file))
        missing = [r.relpath for r in records if r.relpath not in assign]
        if missing:
            raise SystemExit(f"--split-file {args.split_file} has no row for {len(missing)} film(s), "
                             f"e.g. {missing[0]}: it was written for other data")
        if is_main:
            D.save_split(assign, records, out, args.seed, str(args.data))
    elif D.manifest_split(records) is not None:
        assign = D.manifest_split(records)  # the merged manifest's own grouped split
        if is_main:
            log.info("using the manifest's split column")
            D.save_split(assign, records, out, args.seed, str(args.data))
    else:
        assign = D.grouped_stratified_split(records, seed=args.seed)
        if is_main:
            D.save_split(assign, records, out, args.seed, str(args.data))
    idx = {s: [i for i, r in enumerate(records) if assign.get(r.relpath) == s] for s in D.SPLITS}
    targets = np.array([label_idx[r.label] for r in records], dtype=np.int64)

    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    if is_main:
        cache = D.build_cache(records, params, cache_dir)
    if distributed:
        dist.barrier()
    if not is_main:
        cache = D.build_cache(records, params, cache_dir, show_progress=False)

    tr_idx, va_idx = idx["train"], idx["val"]
    if not va_idx:
        raise SystemExit("the validation split is empty: model selection needs validation films")
    weights = class_weights(targets[tr_idx], len(labels))
    draw = None
    if balance != "none":
        draw = sample_weights([records[i].label for i in tr_idx], [records[i].source for i in tr_idx], balance)
        weights = np.ones(len(labels))  # the sampler balances; the loss does not weight again
    if is_main:
        log.info("labels %s; split train %d / val %d / test %d; critical class(es) %s", labels, len(tr_idx),
                 len(va_idx), len(idx["test"]), ", ".join(criticals))
        if draw is None:
            log.info("class weights (inverse frequency): %s",
                     ", ".join(f"{n}={w:.3f}" for n, w in zip(labels, weights)))
        else:
            mass = Counter()
            for i, w in zip(tr_idx, draw):
                mass[(records[i].source or "-", records[i].label)] += float(w)
            log.info("balanced sampling (%s): %s", balance,
                     ", ".join(f"{s}/{c}={m:.3f}" for (s, c), m in sorted(mass.items())))

    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(labels)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1), eta_min=args.lr * 0.01)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3,
                                                           patience=args.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    crit = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))

    start_epoch, best_auc, bad_epochs, history = 1, -1.0, 0, []
    version = args.model_version or f"{args.arch}-{args.input_size}-{time.strftime('%Y%m%d', time.gmtime())}"
    last_path, best_path = out / "last.pt", out / "best.pt"
    if args.init_from and not args.resume:
        init = read_checkpoint(Path(args.init_from))
        m = init["meta"]
        if m["labels"] != labels or m["arch"] != args.arch or m["input_size"] != args.input_size:
            raise SystemExit(f"--init-from: {args.init_from} has labels/arch/input size "
                             f"{m['labels']}/{m['arch']}/{m['input_size']}, this run "
                             f"{labels}/{args.arch}/{args.input_size}")
        model.load_state_dict({k: v.float() for k, v in init["state_dict"].items()})
        if is_main:
            log.info("initialised from %s (%s, epoch %s)", args.init_from, m.get("version"),
                     m.get("metrics", {}).get("epoch"))
    if args.resume:
        if not last_path.is_file():
            raise SystemExit(f"--resume: {last_path} not found")
        ck = read_checkpoint(last_path)
        if ck["meta"]["labels"] != labels or ck["meta"]["arch"] != args.arch \
                or ck["meta"]["input_size"] != args.input_size:
            raise SystemExit(f"--resume: {last_path} was trained with labels/arch/input size "
                             f"{ck['meta']['labels']}/{ck['meta']['arch']}/{ck['meta']['input_size']}")
        model.load_state_dict(ck["state_dict"])
        st = ck["train_state"]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if amp and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, best_auc, bad_epochs = st["epoch"] + 1, st["best_auc"], st["bad_epochs"]
        history = st["history"]
        version = ck["meta"]["version"]
        if is_main:
            log.info("resumed from %s at epoch %d (best val macro AUC %.4f)", last_path, st["epoch"], best_auc)
        if bad_epochs >= args.patience:
            start_epoch = args.epochs + 1  # it had stopped early: nothing left to train
            if is_main:
                log.info("the run had stopped early (no val macro AUC gain for %d epochs): nothing to resume",
                         bad_epochs)

    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    train_ds = CachedDataset(cache, tr_idx, targets[tr_idx], params, augment=augment, seed=args.seed)
    if draw is not None:
        sampler = BalancedSampler(draw, len(tr_idx), args.seed, rank, world)
    elif distributed:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler = None
    base_meta = {
        "labels": labels, "arch": args.arch, "input_size": args.input_size, "preprocess": params,
        "thresholds": {c: 0.5 for c in criticals}, "temperature": 1.0, "critical_labels": list(criticals),
        "data_manifest_sha256": D.manifest_sha256(records), "version": version,
        "calibrated": False, "seed": args.seed, "class_weights": [float(w) for w in weights],
        "train_counts": {n: int((targets[tr_idx] == i).sum()) for i, n in enumerate(labels)},
        "schedule": args.schedule, "lr": args.lr, "augment": augment, "balance": balance,
        "train_sources": dict(sorted(Counter(records[i].source or "-" for i in tr_idx).items())),
    }
    if args.init_from:
        base_meta["init_from"] = {"path": Path(args.init_from).name, "version": init["meta"].get("version"),
                                  "sha256": init["sha256"], "epoch": init["meta"].get("metrics", {}).get("epoch")}

    from tqdm import tqdm

    for epoch in range(start_epoch, args.epochs + 1):
        train_ds.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
            # a last batch of one film breaks batch norm: drop it then
            loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                pin_memory=device.type == "cuda", drop_last=len(sampler) % args.batch_size == 1)
        else:
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=RandomSampler(train_ds, generator=g),
                                num_workers=args.workers, pin_memory=device.type == "cuda",
                                drop_last=len(train_ds) % args.batch_size == 1)
        net.train()
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        n_batches = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=not is_main,
                   mininterval=10.0, file=sys.stderr)
        for b, (x, y) in enumerate(loader):
            if b >= n_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=amp):
                loss = crit(net(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} batch {b}")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
        bar.close()
        train_time = time.perf_counter() - t0
        stats = torch.tensor([loss_sum, seen, train_time], dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(stats)
        train_loss = float(stats[0] / max(stats[1], 1))
        imgs_per_s = float(stats[1]) / (float(stats[2]) / world)

        # validation on rank 0; result broadcast so every rank steps its scheduler the same way
        val = torch.zeros(3, dtype=torch.float64, device=device)
        if is_main:
            logits = predict_logits(model, cache, va_idx, params, device, amp=amp, channels_last=channels_last)
            pv = softmax(logits)
            yv = targets[va_idx]
            val_auc = macro_auc(yv, pv)
            val_loss = float(-np.mean(np.log(np.clip(pv[np.arange(len(yv)), yv], 1e-12, None))))
            val_acc = float((pv.argmax(1) == yv).mean())
            val = torch.tensor([val_auc, val_loss, val_acc], dtype=torch.float64, device=device)
        if distributed:
            dist.broadcast(val, src=0)
        val_auc, val_loss, val_acc = (float(v) for v in val)
        if args.schedule == "cosine":
            sched.step()
        else:
            sched.step(val_auc)
        improved = val_auc > best_auc + 1e-5
        if improved:
            best_auc, bad_epochs = val_auc, 0
        else:
            bad_epochs += 1
        rec = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_macro_auc": val_auc,
               "val_accuracy": val_acc, "images_per_s": imgs_per_s, "train_seconds": float(stats[2]) / world,
               "lr": opt.param_groups[0]["lr"], "world_size": world, "device": device.type}
        history.append(rec)
        if is_main:
            log.info("epoch %d/%d loss %.4f val_loss %.4f val_macro_auc %.4f val_acc %.3f %.1f img/s lr %.2g%s",
                     epoch, args.epochs, train_loss, val_loss, val_auc, val_acc, imgs_per_s,
                     opt.param_groups[0]["lr"], " *best*" if improved else "")
            meta = dict(base_meta, metrics={"val_macro_auc": val_auc, "val_accuracy": val_acc, "epoch": epoch,
                                            "val_loss": val_loss})
            if improved:
                atomic_torch_save(make_checkpoint(model, meta), best_path)
            ck = make_checkpoint(model, meta)
            ck["train_state"] = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "scaler": scaler.state_dict() if amp else {}, "epoch": epoch,
                                 "best_auc": best_auc, "bad_epochs": bad_epochs, "history": history}
            atomic_torch_save(ck, last_path)
            (out / "history.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
            plot_curves(history, out / "curves.png")
        if bad_epochs >= args.patience:
            if is_main:
                log.info("early stopping: no val macro AUC gain for %d epochs (best %.4f)", bad_epochs, best_auc)
            break
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return {"best_val_macro_auc": best_auc, "epochs": len(history), "history": history}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
