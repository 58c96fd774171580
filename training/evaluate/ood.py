"""Fit a classifier's out-of-domain reference and measure what the eligibility rules refuse.

    python -m training.evaluate.ood --checkpoint CK --train-data DIR --split-file SPLIT.csv \\
        --external NAME=DIR ... --probes runs/probes --segmenter-split runs/lung-unet/split.json \\
        --out-reference CK.ood.pt --results training/results/ood-v2

1. Penultimate features of the classifier's own training films -> class means and one shared
   covariance (Ledoit-Wolf shrinkage); the score of a film is its smallest Mahalanobis distance to
   a class mean (:class:`cxr_node.model.infer.OodReference`).
2. The threshold is chosen on **validation** films only: the classifier's validation split and
   half of each external source's patients (the other half is test), as the largest per-source
   97.5th percentile of the scores of films that pass the lung-field rules. Probe set ``val``
   (``training.evaluate.probes``) is looked at to report, never to fit.
3. Every set is then run through the serving rules (:func:`cxr_node.eligibility.rules.pixel_reason`:
   lung fields, then the score) and the refusal rates are written with Wilson intervals.

External films that trained the lung segmenter (``--segmenter-split`` train) are left out, so the
lung rule is not judged on films it learned from.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger("training.evaluate.ood")


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` (n, d)."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    beta = sum(((np.outer(r, r) - s) ** 2).sum() for r in x) / (d * n * n)
    shrink = min(beta, delta) / delta if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(d)


def half(patient: str) -> str:
    return "val" if int(hashlib.sha1(patient.encode()).hexdigest(), 16) % 2 == 0 else "test"


def external_sets(specs: Sequence[str], seg_train: set[str], per_source: int | None) -> dict[str, dict[str, list[Path]]]:
    """NAME=DIR -> {NAME: {val: [...], test: [...]}}, frontal films, split by patient."""
    out = {}
    for spec in specs:
        name, d = spec.split("=", 1)
        root = Path(d)
        with open(root / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        sets = {"val": [], "test": []}
        for r in rows:
            if r["path"] in seg_train and "ieee8023" in str(root):
                continue
            sets[half(r.get("patient_id") or r["path"])].append(root / r["path"])
        if per_source:
            rng = np.random.default_rng(0)
            for k in sets:
                if len(sets[k]) > per_source:
                    sets[k] = [sets[k][i] for i in sorted(rng.choice(len(sets[k]), per_source, replace=False))]
        out[name] = sets
    return out


def features_and_lungs(paths: Sequence[Path], model, params: dict, segmenter, layer: str, desc: str):
    from tqdm import tqdm

    from cxr_node.errors import PreprocessError
    from cxr_node.model.preprocess import prepare

    feats, lungs, kept = [], [], []
    box = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: box.__setitem__("f", o.detach()))
    try:
        for p in tqdm(paths, desc=desc, unit="film"):
            try:
                pr = prepare(p, params, segmenter)
            except PreprocessError as e:
                log.info("%s: unusable (%s)", p, e)
                continue
            with torch.inference_mode():
                model(pr.x[None])
            feats.append(box["f"][0].double().numpy())
            lungs.append(pr.lungs)
            kept.append(p)
    finally:
        hook.remove()
    return np.stack(feats), lungs, kept


def wilson(k: int, n: int) -> list[float]:
    from cxr_node.model.calibration import wilson_interval

    return list(wilson_interval(k, n))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m training.evaluate.ood", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--train-data", required=True, help="folder the split file's paths are relative to")
    ap.add_argument("--split-file", required=True, help="CSV with path,label,...,split (the classifier's split)")
    ap.add_argument("--external", action="append", default=[], help="NAME=DIR of frontal chest films not trained on")
    ap.add_argument("--per-source", type=int, default=150, help="films per external source and half")
    ap.add_argument("--max-val", type=int, default=400, help="classifier validation films to score")
    ap.add_argument("--max-train", type=int, default=2500, help="classifier training films to fit on (random)")
    ap.add_argument("--probes", required=True, help="output folder of python -m training.evaluate.probes")
    ap.add_argument("--laterals", help="folder of lateral views (test probes)")
    ap.add_argument("--dicom-samples", help="folder with dx_image.dcm (test probe)")
    ap.add_argument("--segmenter-split", help="split.json of the lung segmenter (its train films are left out)")
    ap.add_argument("--percentile", type=float, default=97.5)
    ap.add_argument("--out-reference", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from cxr_node.eligibility.refusal import RefusalCode
    from cxr_node.eligibility.rules import pixel_reason
    from cxr_node.model.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
    from cxr_node.model.infer import FEATURE_LAYERS, OOD_KIND
    from cxr_node.model.lungs import shared_segmenter
    from training.evaluate.probes import write_probes

    model, meta = load_checkpoint(a.checkpoint)
    params, layer = dict(meta["preprocess"]), FEATURE_LAYERS[meta["arch"]]
    seg = shared_segmenter()
    with open(a.split_file, newline="") as f:
        split_rows = list(csv.DictReader(f))
    root = Path(a.train_data)
    train = [(root / r["path"], meta["labels"].index(r["label"])) for r in split_rows if r["split"] == "train"]
    if len(train) > a.max_train:
        train = [train[i] for i in sorted(np.random.default_rng(1).choice(len(train), a.max_train, replace=False))]
    val = [root / r["path"] for r in split_rows if r["split"] == "val"]
    val = [val[i] for i in sorted(np.random.default_rng(0).choice(len(val), min(a.max_val, len(val)), replace=False))]
    seg_train = set()
    if a.segmenter_split:
        seg_train = {p for p, s in json.loads(Path(a.segmenter_split).read_text())["assign"].items() if s == "train"}

    # 1. fit on the classifier's training films
    f_train, _, kept = features_and_lungs([p for p, _ in train], model, params, seg, layer, "training films")
    y_train = np.array([y for p, y in train if p in set(kept)])
    means = np.stack([f_train[y_train == k].mean(0) for k in range(len(meta["labels"]))])
    cov = ledoit_wolf(f_train - means[y_train])
    precision = np.linalg.inv(cov)

    def score(f: np.ndarray) -> np.ndarray:
        d = f[:, None, :] - means[None]
        return np.sqrt(np.einsum("bkd,de,bke->bk", d, precision, d).clip(0).min(1))

    # 2. the sets
    ext = external_sets(a.external, seg_train, a.per_source)
    probes = write_probes(Path(a.probes), {"val": val[:20], "test": [p for s in ext.values() for p in s["test"][:10]]},
                          dicom_samples=a.dicom_samples, laterals=a.laterals)
    sets: dict[str, dict[str, list[Path]]] = {"val": {"in-distribution (validation split)": val},
                                              "test": {}}
    for name, s in ext.items():
        sets["val"][f"{name} (other source)"] = s["val"]
        sets["test"][f"{name} (other source)"] = s["test"]
    scored: dict[str, dict[str, dict]] = {"val": {}, "test": {}}
    for split in ("val", "test"):
        for kind, paths in list(sets[split].items()) + [(f"probe: {k}", v) for k, v in probes[split].items()]:
            f, lungs, kept = features_and_lungs(paths, model, params, seg, layer, f"{split} {kind}")
            scored[split][kind] = {"scores": score(f), "lungs": lungs, "paths": [str(p) for p in kept],
                                   "chest": not kind.startswith("probe")}
    # 3. threshold on validation chest films that pass the lung rules
    per_source = {k: float(np.percentile(v["scores"][[lf.plausible for lf in v["lungs"]]], a.percentile))
                  for k, v in scored["val"].items() if v["chest"]}
    threshold = max(per_source.values())
    log.info("per-source %.1fth percentiles %s -> threshold %.2f", a.percentile, per_source, threshold)

    report = {"threshold": threshold, "rule": f"max over validation sources of the {a.percentile}th percentile "
              "of chest films passing the lung rules", "per_source_percentile": per_source, "sets": {}}
    for split in ("val", "test"):
        for kind, v in scored[split].items():
            reasons = [pixel_reason(lf, float(s), threshold) for lf, s in zip(v["lungs"], v["scores"])]
            n, k = len(reasons), sum(r is not None for r in reasons)
            by_lungs = sum(r is not None and r.code != RefusalCode.OUT_OF_DOMAIN for r in reasons)
            report["sets"][f"{split}: {kind}"] = {
                "n": n, "refused": k, "refused_rate": k / n if n else None, "ci95": wilson(k, n) if n else None,
                "refused_by_lung_rules": by_lungs, "refused_by_score": k - by_lungs, "chest": v["chest"],
                "score_median": float(np.median(v["scores"])) if n else None,
                "examples_passed": [p for p, r in zip(v["paths"], reasons) if r is None][:3] if not v["chest"] else []}
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.json").write_text(json.dumps(report, indent=1))
    ref_meta = {"kind": OOD_KIND, "version": f"{meta['version']}-ood1", "classifier_sha256": meta["weights_sha256"],
                "classifier_version": meta["version"], "feature_layer": layer, "threshold": threshold,
                "method": "min class-conditional Mahalanobis distance, shared Ledoit-Wolf covariance",
                "fit_films": int(len(f_train)), "percentile": a.percentile, "per_source_percentile": per_source}
    sd = {"means": torch.tensor(means, dtype=torch.float32), "precision": torch.tensor(precision, dtype=torch.float32)}
    atomic_torch_save(make_checkpoint(sd, ref_meta), a.out_reference)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("n", "refused", "refused_rate")}
                      for k, v in report["sets"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
