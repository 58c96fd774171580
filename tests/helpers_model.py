"""Helpers for the model/training tests: tiny generated datasets and checkpoints (no external data)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

LABELS = ["COVID", "Normal", "Viral Pneumonia"]


def synthetic_film(kind: int, rng: np.random.Generator, size: int = 80) -> np.ndarray:
    """A uint8 greyscale 'film' whose texture depends on ``kind`` so a network can tell them apart."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.35 + 0.3 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.08)
    if kind == 0:  # bright blobs in the lower fields
        for _ in range(4):
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.55, 0.85)
            base += 0.35 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.004)
    elif kind == 2:  # horizontal stripes
        base += 0.15 * np.sin(yy * 40 + rng.uniform(0, 6))
    base += rng.normal(0, 0.03, base.shape)
    return np.clip(base * 255, 0, 255).astype(np.uint8)


def make_tree(root: Path, per_class: int = 10, size: int = 80, seed: int = 0) -> Path:
    """``root/<label>/<i>.png`` for the three labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, label in enumerate(LABELS):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_film(k, rng, size)).save(d / f"{label[:3].lower()}-{i:03d}.png")
    return root


def make_manifest(root: Path, per_class: int = 10, size: int = 80, seed: int = 0) -> Path:
    """A tree plus manifest.csv in the dataset's format, with patient and near-duplicate groups."""
    make_tree(root, per_class, size, seed)
    rows = []
    for label in LABELS:
        for i, f in enumerate(sorted((root / label).glob("*.png"))):
            pid = f"p{i // 3}" if label == "Viral Pneumonia" else ""  # 3 films per patient
            nd = f"nd{label[:3]}{i // 2}" if label == "COVID" and i < 4 else ""  # two pairs
            rows.append([f.relative_to(root).as_posix(), label, f.name, size, size, pid, nd])
    m = root / "manifest.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "source_file", "original_width", "original_height", "patient_id",
                    "near_dup_group"])
        w.writerows(rows)
    return m


def make_checkpoint(path: Path, input_size: int = 64, seed: int = 0, thresholds: dict | None = None,
                    temperature: float = 1.0, arch: str = "densenet121") -> Path:
    """A randomly initialised but complete checkpoint (no training)."""
    import torch

    from cxr_node.model import build_model, save_checkpoint
    from cxr_node.preprocess import make_params

    torch.manual_seed(seed)
    model = build_model(arch, len(LABELS))
    meta = {"labels": LABELS, "arch": arch, "input_size": input_size,
            "preprocess": make_params(input_size=input_size), "thresholds": thresholds or {"COVID": 0.5},
            "temperature": temperature, "metrics": {}, "data_manifest_sha256": "0" * 64,
            "version": f"test-{arch}-{input_size}", "critical_labels": ["COVID"]}
    return save_checkpoint(path, model, meta)


def bundled_or_tiny(tmp: Path) -> Path:
    """The bundled model if it is in the checkout, else a tiny random checkpoint."""
    from cxr_node.config import BUNDLED_CHECKPOINT

    if BUNDLED_CHECKPOINT.is_file():
        return BUNDLED_CHECKPOINT
    return make_checkpoint(tmp / "tiny.pt")
