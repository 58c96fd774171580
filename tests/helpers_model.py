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


def make_tree(root: Path, per_class: int = 10, size: int = 80, seed: int = 0,
              labels: list[str] | None = None) -> Path:
    """``root/<label>/<i>.png`` for ``labels`` (default the three of LABELS; the k-th label gets
    texture ``k % 3``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, label in enumerate(labels or LABELS):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_film(k % 3, rng, size)).save(d / f"{label[:3].lower()}-{i:03d}.png")
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


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _film(path: Path, kind: int, rng: np.random.Generator, size: int = 80) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_film(kind, rng, size)).save(path)


def make_sources(root: Path, n: int = 8, seed: int = 0) -> dict[str, Path]:
    """Four small source folders shaped like ../shared/data's (same manifest columns and overlap
    columns), with the overlaps and label conflicts the real ones have:

    * hannover ``COVID/h000.png`` is in covid19-radiography as ``COVID/COVID-0.png``;
    * ieee8023 ``COVID/h001.png`` and ``No Finding/h002.png`` (site Hannover) are hannover's films
      with the same stems; the second is a conflict (COVID there, No Finding here);
    * ieee8023 ``COVID/h900.png`` is a Hannover film that hannover-covid lacks;
    * ieee8023 ``No Finding/x000.png`` is a plain ieee8023 No Finding film (dropped by the rule);
    * ieee8023 ``COVID/i000.png`` is in covid19-radiography as ``COVID/COVID-2.png``, whose near-duplicate
      ``COVID/COVID-3.png`` (kept) thereby shares i000's group;
    * nih ``Pneumonia/00000001_000.png`` is covid19-radiography ``Normal/Normal-0.png`` (a conflict),
      and nih ``No Finding/00000002_000.png`` is ``Normal/Normal-1.png`` (same label);
    * nih patient ``00000001`` has a second film; ieee8023 patient ``1`` is someone else.
    """
    rng = np.random.default_rng(seed)
    out = {}
    # covid19-radiography
    c = root / "covid19-radiography"
    rows = []
    for label, kind, stem in (("COVID", 0, "COVID"), ("Normal", 1, "Normal"), ("Viral Pneumonia", 2, "person")):
        for i in range(n):
            rel = f"{label}/{stem}-{i}.png"
            _film(c / rel, kind, rng)
            nd = "ndCOVID-2" if label == "COVID" and i in (2, 3) else ""
            pid = f"person{i // 2}" if label == "Viral Pneumonia" else ""
            rows.append([rel, label, rel, 80, 80, pid, nd])
    out["covid19-radiography"] = _write_csv(c / "manifest.csv", ["path", "label", "source_file", "original_width",
                                            "original_height", "patient_id", "near_dup_group"], rows).parent
    # hannover
    h = root / "hannover-covid"
    rows = []
    for i in range(n):
        rel = f"COVID/h{i:03d}.png"
        _film(h / rel, 0, rng)
        rows.append([rel, "COVID", f"hp{i // 3}", "ap", "CR", rel, "", "COVID/COVID-0.png" if i == 0 else ""])
    out["hannover"] = _write_csv(h / "manifest.csv", ["path", "label", "patient_id", "view", "modality", "source_file",
                                 "near_dup_group", "also_in_covid19_radiography"], rows).parent
    # nih
    d = root / "nih-chestxray8-subset"
    rows = []
    for label, kind in (("No Finding", 1), ("Pneumonia", 2)):
        for i in range(n):
            pid = f"{i + 1:08d}" if label == "Pneumonia" else f"{i + 2 + n:08d}"
            if label == "No Finding" and i == 0:
                pid = "00000002"
            fu = 1 if (label == "Pneumonia" and i == n - 1) else 0
            if fu:
                pid = "00000001"
            rel = f"{label}/{pid}_{fu:03d}.png"
            _film(d / rel, kind, rng)
            also = {("Pneumonia", 0): "Normal/Normal-0.png",
                    ("No Finding", 0): "Normal/Normal-1.png"}.get((label, i), "")
            rows.append([rel, label, pid, rel, "", also])
    out["nih"] = _write_csv(d / "manifest.csv", ["path", "label", "patient_id", "source_file", "near_dup_group",
                            "also_in_covid19_radiography"], rows).parent
    # ieee8023
    e = root / "ieee8023-covid-chestxray"
    rows = []
    han = "Hannover Medical School, Hannover, Germany"
    spec = [("COVID/h001.png", "COVID", "COVID-19", "1", han, "Germany", ""),
            ("No Finding/h002.png", "No Finding", "No Finding", "2", han, "Germany", ""),
            ("COVID/h900.png", "COVID", "COVID-19", "5", han, "Germany", ""),
            ("No Finding/x000.png", "No Finding", "No Finding", "3", "Milan, Italy", "Italy", ""),
            ("COVID/i000.png", "COVID", "COVID-19", "4", "Milan, Italy", "Italy", "COVID/COVID-2.png")]
    for i in range(1, n):
        city, country = ("Rome, Italy", "Italy") if i % 2 else ("Madrid, Spain", "Spain")
        spec.append((f"COVID/i{i:03d}.png", "COVID", "COVID-19", str(10 + i), city, country, ""))
        spec.append((f"Other pneumonia/o{i:03d}.png", "Other pneumonia", "Streptococcus", str(30 + i),
                     "Toronto, Canada", "Canada", ""))
    for rel, label, finding, pid, site, country, also in spec:
        _film(e / rel, {"COVID": 0, "No Finding": 1}.get(label, 2), rng)
        rows.append([rel, label, finding, pid, "PA", site, country, "2020", "M", "50", "", "", "", rel, "", also, ""])
    out["ieee8023"] = _write_csv(e / "manifest.csv", ["path", "label", "finding", "patient_id", "view", "site",
                                 "country", "date", "sex", "age", "license", "doi", "url", "source_file",
                                 "near_dup_group", "also_in_covid19_radiography", "lung_mask"], rows).parent
    return out


FIVE_LABELS = ["COVID", "Normal", "Other pneumonia", "Tuberculosis", "Viral Pneumonia"]  # the v4 recipe's


def make_checkpoint(path: Path, input_size: int = 64, seed: int = 0, thresholds: dict | None = None,
                    temperature: float = 1.0, arch: str = "densenet121", labels: list[str] | None = None,
                    critical: list[str] | None = None, abnormal_threshold: float | None = None) -> Path:
    """A randomly initialised but complete checkpoint (no training); ``labels`` and ``critical``
    default to the three labels with COVID critical (e.g. FIVE_LABELS with COVID and Tuberculosis).
    ``abnormal_threshold``: with a random abnormality head (the v5 kind) at that operating point."""
    import torch

    from cxr_node.model.checkpoint import build_model, save_checkpoint
    from cxr_node.model.preprocess import make_params

    torch.manual_seed(seed)
    labels = list(labels or LABELS)
    model = build_model(arch, len(labels))
    meta = {"labels": labels, "arch": arch, "input_size": input_size,
            "preprocess": make_params(input_size=input_size), "thresholds": thresholds or {"COVID": 0.5},
            "temperature": temperature, "metrics": {}, "data_manifest_sha256": "0" * 64,
            "version": f"test-{arch}-{input_size}", "critical_labels": list(critical or ["COVID"])}
    if abnormal_threshold is None:
        return save_checkpoint(path, model, meta)
    import numpy as np

    from cxr_node.model.abnormality import LABELS as ABN
    from cxr_node.model.abnormality import AbnormalityHead
    from cxr_node.model.adaptation import LogisticHead
    from cxr_node.model.checkpoint import output_features

    rng = np.random.default_rng(seed)
    d = int(model.class_layers.out.in_features) if hasattr(model, "class_layers") else output_features(model)
    head = AbnormalityHead(LogisticHead(ABN, np.zeros(d), np.ones(d), rng.normal(0, 0.05, (2, d)), np.zeros(2), 1.0),
                           ("class_layers.flatten",), float(abnormal_threshold), "test: random head")
    meta["abnormality"] = head.meta()
    meta["version"] += "-abnormal"
    return save_checkpoint(path, {**model.state_dict(), **head.state_tensors()}, meta)


def bundled_or_tiny(tmp: Path) -> Path:
    """The bundled model if it is in the checkout, else a tiny random checkpoint."""
    from cxr_node.config import BUNDLED_CHECKPOINT

    if BUNDLED_CHECKPOINT.is_file():
        return BUNDLED_CHECKPOINT
    return make_checkpoint(tmp / "tiny.pt")


def make_tb_sources(root: Path, n: int = 8, seed: int = 1) -> dict[str, Path]:
    """The two single-site folders of issue 20, shaped like ../shared/data's: ``nlm-shenzhen-tb``
    (Normal and Tuberculosis, CHNCXR stems, patient_id empty on the second half to exercise the
    one-film-per-case rule) and ``openist-normal`` (Normal only, site "unknown ...", no patient ids)."""
    rng = np.random.default_rng(seed)
    out = {}
    s = root / "nlm-shenzhen-tb"
    rows = []
    for label, kind, tag in (("Normal", 1, 0), ("Tuberculosis", 0, 1)):
        for i in range(n):
            stem = f"CHNCXR_{i + 100 * tag:04d}_{tag}"
            rel = f"{label}/{stem}.png"
            _film(s / rel, kind, rng)
            rows.append([rel, label, "Shenzhen No.3 People's Hospital, Shenzhen, Guangdong", "China",
                         stem if i < n // 2 else "", "", ""])
    out["shenzhen"] = _write_csv(s / "manifest.csv", ["path", "label", "site", "country", "patient_id", "also_in",
                                                      "near_dup_group"], rows).parent
    o = root / "openist-normal"
    rows = []
    for i in range(n):
        rel = f"Normal/{i}-{i + 9}-500-500-100.png"
        _film(o / rel, 1, rng)
        rows.append([rel, "Normal", "unknown (images from the chestx-ray.com teaching module)", "unknown", "", "", ""])
    out["openist"] = _write_csv(o / "manifest.csv", ["path", "label", "site", "country", "patient_id", "also_in",
                                                     "near_dup_group"], rows).parent
    return out
