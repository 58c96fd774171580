"""What the training loop draws from: the cached films as a dataset, augmentation by recipe, the critical
classes, sample and class weights, the balanced sampler; the curves it plots."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("training.train")

DEFAULT_CRITICAL = "COVID"


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
    :func:`training.train.augment.make_v3_augment`."""
    if recipe == "v3":
        from training.train.augment import make_v3_augment

        return make_v3_augment(size)
    if recipe == "v4":
        from training.train.augment import make_v4_augment

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

    from training.train.transforms import RandWindowJitter

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
                             "(python -m training.data.sources build); use --balance class")
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


def dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local
