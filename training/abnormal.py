"""The v5 protocol's abnormality output (training/results/v5/PROTOCOL.md): "abnormal (any finding) vs
normal", asked within each hospital, as a logistic head on the bundled backbone's frozen features.

    # 1. every film once through the bundled model: pooled features of three layers, and its logits
    python -m training.abnormal extract --manifest runs/v5/merged.csv --out runs/v5/features.npz
    # 2. leave-source-out: the head (per feature set) and v2 scored by 1 - p(Normal), every hold-out
    python -m training.abnormal lso --manifest runs/v5/merged.csv --features runs/v5/features.npz \\
        --out training/results/v5/lso-trainval
    # 3. the final head on every source, written into a checkpoint beside the bundled weights
    python -m training.abnormal export --manifest ... --features ... --out cxr_node/models/cxr-densenet121-v5.pt

The target is ``Abnormal`` = any label that is not Normal / No Finding. A head is fitted only on
sources that hold both classes (the disease labels whose positives and negatives come from other
hospitals teach the hospital), with sample weights equal per source x class, L2 chosen by the fold's
pooled validation AUC. Feature sets: ``final`` (the pooled penultimate layer, what site heads use),
``multi`` (``final`` + the pooled outputs of dense blocks 2 and 3).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("training.abnormal")

NORMAL_LABELS = ("Normal", "No Finding")
#: Layers whose pooled outputs are extracted, by the names the feature sets use.
LAYERS = {"final": "class_layers.flatten", "block3": "features.denseblock3", "block2": "features.denseblock2"}
FEATURE_SETS = {"final": ("final",), "multi": ("final", "block3", "block2")}
#: The hold-outs whose AUC the protocol reads (sources holding both classes), and the normal-only ones.
AUC_HOLDOUTS = ("nih", "shenzhen", "ieee8023", "covid19-radiography")
NORMAL_ONLY_HOLDOUTS = ("openist",)
ABNORMAL_ONLY_HOLDOUTS = ("hannover",)
L2_GRID = (1000.0, 100.0, 10.0, 1.0)  # inverse of C = 0.001 .. 1
CAPS = {"covid19-radiography": {"train": 600, "val": 150, "test": 150}}


def is_abnormal(label: str) -> bool:
    return label not in NORMAL_LABELS


# --------------------------------------------------------------------------- extraction


def cmd_extract(args: argparse.Namespace) -> None:
    import torch

    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.checkpoint import load_checkpoint
    from training import data as D
    from training.common import predict_logits
    from training.lso import read_rows

    torch.set_num_threads(args.threads)
    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude")]
    rng = np.random.default_rng(args.seed)
    drop: set[str] = set()
    for src, per_split in CAPS.items():
        for split, n in per_split.items():
            for lab in sorted({r["label"] for r in rows if r["source"] == src}):
                cell = [r for r in rows if r["source"] == src and r["split"] == split and r["label"] == lab]
                if len(cell) > n:
                    chosen = set(rng.choice(len(cell), n, replace=False).tolist())
                    drop |= {cell[i]["id"] for i in range(len(cell)) if i not in chosen}
    rows = [r for r in rows if r["id"] not in drop]
    ck = Path(args.checkpoint) if args.checkpoint else BUNDLED_CHECKPOINT
    model, meta = load_checkpoint(ck, torch.device("cpu"))
    modules = dict(model.named_modules())
    grabbed: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}

    def hook(name: str):
        def f(_m, _a, out):
            o = out.detach().float()
            if o.ndim == 4:
                o = o.mean(dim=(2, 3))
            grabbed[name].append(o.numpy().copy())
        return f

    for name, layer in LAYERS.items():
        modules[layer].register_forward_hook(hook(name))
    recs = [D.Record(r["abspath"], r["label"], r["group"], r["abspath"]) for r in rows]
    cache = D.build_cache(recs, meta["preprocess"], Path(args.cache_dir))
    log.info("%d films through %s", len(rows), meta["version"])
    logits = predict_logits(model, cache, range(len(recs)), meta["preprocess"], torch.device("cpu"), batch_size=64)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, ids=np.array([r["id"] for r in rows]), logits=logits.astype(np.float32),
                        labels=np.array(meta["labels"]), weights_sha256=np.array(str(meta["weights_sha256"])),
                        checkpoint=np.array(str(ck)), version=np.array(str(meta["version"])),
                        **{f"f_{k}": np.concatenate(v).astype(np.float32) for k, v in grabbed.items()})
    log.info("wrote %s: %s", out, {k: np.concatenate(v).shape for k, v in grabbed.items()})


# --------------------------------------------------------------------------- heads and folds

POOLS = {"all": None, "within": AUC_HOLDOUTS}
CANDIDATES = tuple(f"{fs}-{pool}" for fs in FEATURE_SETS for pool in POOLS)
HOLDOUTS = AUC_HOLDOUTS + NORMAL_ONLY_HOLDOUTS + ABNORMAL_ONLY_HOLDOUTS
DEV = ("train", "val")


class Features:
    """The extracted features: ids -> rows of each feature set, and v2's softmax (its temperature)."""

    def __init__(self, path: Path) -> None:
        from cxr_node.model.calibration import softmax
        from training.frozen import bundled_meta

        z = np.load(path)
        self.ids = [str(x) for x in z["ids"]]
        self.index = {i: k for k, i in enumerate(self.ids)}
        self.sets = {name: np.concatenate([z[f"f_{part}"] for part in parts], axis=1).astype(np.float64)
                     for name, parts in FEATURE_SETS.items()}
        self.labels = [str(x) for x in z["labels"]]
        self.checkpoint = Path(str(z["checkpoint"]))
        self.bundled = bundled_meta(self.checkpoint)
        self.v2 = softmax(z["logits"].astype(np.float64), self.bundled["temperature"])
        self.weights_sha256 = str(z["weights_sha256"])

    def x(self, name: str, rows: Sequence[dict]) -> np.ndarray:
        return self.sets[name][[self.index[r["id"]] for r in rows]]

    def v2_scores(self, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        p = self.v2[[self.index[r["id"]] for r in rows]]
        return 1.0 - p[:, self.labels.index("Normal")], p[:, self.labels.index("COVID")]


def cell_weights(rows: Sequence[dict]) -> np.ndarray:
    """Every source x {Normal, Abnormal} cell gets the same total weight; mean 1."""
    cells = [(r["source"], is_abnormal(r["label"])) for r in rows]
    n = Counter(cells)
    w = np.array([1.0 / (len(n) * n[c]) for c in cells])
    return w * (len(w) / w.sum())


def mean_source_auc(rows: Sequence[dict], score: np.ndarray) -> tuple[float, dict[str, float]]:
    from cxr_node.model.calibration import roc_auc

    per = {}
    for src in sorted({r["source"] for r in rows}):
        i = [k for k, r in enumerate(rows) if r["source"] == src]
        y = np.array([is_abnormal(rows[k]["label"]) for k in i])
        if 0 < y.sum() < len(y):
            per[src] = float(roc_auc(y, score[i]))
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def fit_abnormal(F: Features, fset: str, tr: Sequence[dict], va: Sequence[dict], grid: Sequence[float] = L2_GRID
                 ) -> dict[str, Any]:
    """The head on ``tr`` for each L2 of ``grid``; the one with the best mean per-source val AUC."""
    from cxr_node.model.abnormality import LABELS as ABN
    from cxr_node.model.adaptation import fit_logistic_head

    xt, yt = F.x(fset, tr), np.array([int(is_abnormal(r["label"])) for r in tr])
    xv = F.x(fset, va)
    best = None
    tried = {}
    head = None
    for l2 in sorted(grid, reverse=True):  # strongest penalty first, each fit starting from the last
        head = fit_logistic_head(xt, yt, ABN, l2=l2, weights=cell_weights(tr), init=head)
        s = head.logits(xv)
        auc, per = mean_source_auc(va, s[:, 1] - s[:, 0])
        tried[str(l2)] = {"val_mean_source_auc": auc, "per_source": per}
        if best is None or auc > best[0]:
            best = (auc, l2, head)
    assert best is not None
    return {"head": best[2], "l2": best[1], "val_mean_source_auc": best[0], "grid": tried,
            "n_train": len(tr), "n_val": len(va), "train_cells": {f"{s}/{'abnormal' if a else 'normal'}": n
                                                                   for (s, a), n in sorted(Counter(
                                                                       (r["source"], is_abnormal(r["label"]))
                                                                       for r in tr).items())}}


def p_abnormal(head, x: np.ndarray) -> np.ndarray:
    s = head.logits(x)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e[:, 1] / e.sum(axis=1)


def fold_rows(rows: Sequence[dict], F: Features, h: str, pool: str | None = None
              ) -> tuple[list[dict], list[dict], list[dict]]:
    """(held-out films to predict, head training films, head validation films) of hold-out ``h``."""
    from training.frozen import seen_copies
    from training.lso import held_out, training_rows

    seen = seen_copies(rows)
    held = held_out(h, rows)
    pred = [r for r in held if r["id"] in F.index and (h == "covid19-radiography" or r["id"] not in seen)]
    sources = POOLS[pool] if pool else None
    cand = [r for r in training_rows(rows, held, list(sources or []), None, None, 0) if r["id"] in F.index]
    return pred, [r for r in cand if r["split"] == "train"], [r for r in cand if r["split"] == "val"]


# --------------------------------------------------------------------------- the gate


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows (training.ood's, with the sum over rows in closed form:
    sum_k ||x_k x_k' - S||^2 = sum_k ||x_k||^4 - n ||S||^2)."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    beta = ((np.einsum("ij,ij->i", x, x) ** 2).sum() - n * (s ** 2).sum()) / (d * n * n)
    shrink = min(max(beta, 0.0), delta) / delta if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(d)


def fit_gate(F: Features, tr: Sequence[dict], va: Sequence[dict], percentile: float = 97.5) -> dict[str, Any]:
    """One Gaussian per source x label cell of ``tr`` (final features, shared covariance); threshold the
    largest per-source ``percentile`` of the ``va`` films' scores."""
    x = F.x("final", tr)
    cells = sorted({(r["source"], r["label"]) for r in tr})
    ci = np.array([cells.index((r["source"], r["label"])) for r in tr])
    means = np.stack([x[ci == k].mean(0) for k in range(len(cells))])
    precision = np.linalg.inv(ledoit_wolf(x - means[ci]))
    g = {"means": means, "precision": precision, "cells": [f"{s}/{lab}" for s, lab in cells]}
    sv = gate_score(g, F.x("final", va))
    per = {src: float(np.percentile(sv[[k for k, r in enumerate(va) if r["source"] == src]], percentile))
           for src in sorted({r["source"] for r in va})}
    g.update(threshold=max(per.values()), per_source_percentile=per, percentile=percentile, fit_films=len(tr))
    return g


def gate_score(g: dict, x: np.ndarray) -> np.ndarray:
    """Smallest Mahalanobis distance to a cell mean (one matrix product per cell)."""
    m = np.stack([(((x - mu) @ g["precision"]) * (x - mu)).sum(1) for mu in g["means"]], axis=1)
    return np.sqrt(m.clip(0).min(1))


# --------------------------------------------------------------------------- leave-source-out


def cmd_lso(args: argparse.Namespace) -> dict:
    """Every candidate and v2 on every hold-out; predictions of all splits (the test ones are only read by
    ``decide``); the development report (train+val films) and the candidate choice. Candidates run one at a
    time in ``--candidates`` order, the files and the report rewritten after each (``--resume`` keeps the
    candidates already in them)."""
    import torch

    from cxr_node.model.infer import OodReference, default_ood_path
    from training.lso import read_rows

    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude")]
    F = Features(Path(args.features))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_path, test_path = out / "predictions-dev.csv", Path(args.test_out)
    folds_path = out / "folds.json"
    if args.resume and dev_path.is_file() and test_path.is_file():
        preds = read_csv(dev_path) + read_csv(test_path)
        folds = json.loads(folds_path.read_text())
    else:
        v2_gate = OodReference(default_ood_path(F.checkpoint), F.weights_sha256)
        preds, folds = [], {}
        for h in HOLDOUTS:
            pred, tr, va = fold_rows(rows, F, h)
            gate = fit_gate(F, tr, va)
            folds[h] = {"n_predicted": len(pred), "candidates": {},
                        "gate": {k: v for k, v in gate.items() if k not in ("means", "precision")}}
            gs = gate_score(gate, F.x("final", pred))
            v2g = v2_gate.score(torch.as_tensor(F.x("final", pred)))
            v2a, v2c = F.v2_scores(pred)
            for k, r in enumerate(pred):
                preds.append({"holdout": h, "id": r["id"], "source": r["source"], "site": r["site"],
                              "label": r["label"], "split": r["split"], "group": r["group"],
                              "abnormal": int(is_abnormal(r["label"])), "v2": f"{v2a[k]:.6f}",
                              "v2_covid": f"{v2c[k]:.6f}", "gate_refused": int(gs[k] > gate["threshold"]),
                              "gate_score": f"{gs[k]:.3f}", "v2_gate_refused": int(v2g[k] > v2_gate.threshold),
                              "v2_gate_score": f"{v2g[k]:.3f}"})
            log.info("hold-out %s: %d films, gate threshold %.1f", h, len(pred), gate["threshold"])
        _save(preds, folds, dev_path, test_path, folds_path)
    rep: dict[str, Any] = {}
    for cand in args.candidates.split(","):
        if cand in preds[0]:
            log.info("%s: already in %s", cand, dev_path)
            continue
        fset, pool = cand.split("-")
        for h in HOLDOUTS:
            pred, tr, va = fold_rows(rows, F, h, pool)
            fit = fit_abnormal(F, fset, tr, va)
            p = p_abnormal(fit["head"], F.x(fset, pred))
            score = dict(zip((r["id"] for r in pred), p))
            for r in preds:
                if r["holdout"] == h:
                    r[cand] = f"{score[r['id']]:.6f}"
            folds[h]["candidates"][cand] = {k: v for k, v in fit.items() if k != "head"}
            log.info("hold-out %s, %s: L2 %g, val mean-source AUC %.3f (%d train films)", h, cand, fit["l2"],
                     fit["val_mean_source_auc"], fit["n_train"])
        _save(preds, folds, dev_path, test_path, folds_path)
        rep = dev_report(preds, args.n_boot, out)
    return rep


def _save(preds: list[dict], folds: dict, dev_path: Path, test_path: Path, folds_path: Path) -> None:
    folds_path.write_text(json.dumps(_plain(folds), indent=1) + "\n", encoding="utf-8")
    write_csv(dev_path, [r for r in preds if r["split"] in DEV])
    test_path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(test_path, [r for r in preds if r["split"] == "test"])  # not read until `decide`


def dev_report(preds: Sequence[dict], n_boot: int, out: Path) -> dict:
    """Development figures (held-out train+val films) of every candidate present and v2, and the choice."""
    dev = [r for r in preds if r["split"] in DEV]
    done = [c for c in CANDIDATES if c in dev[0]]
    rep: dict[str, Any] = {"films": "held-out train+val films (development)", "candidates_run": done,
                           "candidates_not_run": [c for c in CANDIDATES if c not in done], "candidates": {}}
    for c in (*done, "v2"):
        rep["candidates"][c] = pooled_auc(dev, c, n_boot)
    rep["challenger"] = max(done, key=lambda c: rep["candidates"][c]["pooled"]["auc"])
    rep["rule"] = "highest pooled abnormal AUC over the four AUC hold-outs' train+val films (PROTOCOL.md)"
    (out / "report.json").write_text(json.dumps(_plain(rep), indent=1) + "\n", encoding="utf-8")
    log.info("challenger so far: %s", rep["challenger"])
    return rep


def _plain(x: Any) -> Any:
    from cxr_node.model.calibration import json_safe

    return json_safe(x)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _auc(rows: Sequence[dict], col: str, n_boot: int, seed: int = 0) -> dict:
    from cxr_node.model.calibration import bootstrap_binary_auc

    y = np.array([r["abnormal"] == "1" or r["abnormal"] == 1 for r in rows])
    s = np.array([float(r[col]) for r in rows])
    g = np.array([f'{r["source"]}/{r["group"]}' for r in rows])
    return bootstrap_binary_auc(y, s, n_boot=n_boot, seed=seed, groups=g)


def pooled_auc(rows: Sequence[dict], col: str, n_boot: int) -> dict:
    auc_rows = [r for r in rows if r["holdout"] in AUC_HOLDOUTS]
    return {"pooled": _auc(auc_rows, col, n_boot),
            "per_holdout": {h: _auc([r for r in auc_rows if r["holdout"] == h], col, n_boot) for h in AUC_HOLDOUTS}}


# --------------------------------------------------------------------------- operating point and decision

TARGET_SENSITIVITY = 0.80
NORMAL_RATE_HOLDOUTS = ("shenzhen", "openist", "nih")
FLAGGED_HOLDOUTS = ("nih", "shenzhen", "ieee8023", "covid19-radiography", "hannover")


def crossfit_threshold(rows: Sequence[dict], col: str, target: float = TARGET_SENSITIVITY) -> float:
    """The highest threshold at which the mean over sources of the share of abnormal films flagged is
    >= ``target`` (each source with abnormal films counts once)."""
    ab = [r for r in rows if r["abnormal"] == "1"]
    by = {}
    for r in ab:
        by.setdefault(r["holdout"], []).append(float(r[col]))
    arrs = [np.sort(np.array(v)) for v in by.values()]
    for t in sorted({x for a in arrs for x in a}, reverse=True):
        if np.mean([(a >= t).mean() for a in arrs]) >= target:
            return float(t)
    return 0.0


def _rate(rows: Sequence[dict], flag) -> dict:
    from cxr_node.model.calibration import rate

    k = sum(1 for r in rows if flag(r))
    return rate(k, len(rows))


def criteria(rows: Sequence[dict], col: str, thresholds: dict[str, float], n_boot: int,
             gate_col: str | None) -> dict[str, Any]:
    """The protocol's criteria 1-5 for one score column on ``rows`` at per-hold-out ``thresholds``."""
    out: dict[str, Any] = pooled_auc(rows, col, n_boot)

    def flagged(r):
        return float(r[col]) >= thresholds[r["holdout"]]

    normals = [r for r in rows if r["holdout"] in NORMAL_RATE_HOLDOUTS and r["abnormal"] == "0"]
    out["urgent_on_normals"] = {h: _rate([r for r in normals if r["holdout"] == h], flagged)
                                for h in NORMAL_RATE_HOLDOUTS}
    out["urgent_on_normals"]["pooled"] = _rate(normals, flagged)
    ab = [r for r in rows if r["holdout"] in FLAGGED_HOLDOUTS and r["abnormal"] == "1"]
    out["abnormal_flagged"] = {h: _rate([r for r in ab if r["holdout"] == h], flagged) for h in FLAGGED_HOLDOUTS}
    out["abnormal_flagged"]["pooled"] = _rate(ab, flagged)
    if gate_col:
        out["refused"] = {h: _rate([r for r in rows if r["holdout"] == h], lambda r: r[gate_col] == "1")
                          for h in HOLDOUTS}
    return out


def paired_auc_difference(rows: Sequence[dict], a: str, b: str, n_boot: int, seed: int = 0) -> dict:
    from cxr_node.model.calibration import roc_auc

    rows = [r for r in rows if r["holdout"] in AUC_HOLDOUTS]
    y = np.array([r["abnormal"] == "1" for r in rows])
    sa, sb = (np.array([float(r[c]) for r in rows]) for c in (a, b))
    g = np.array([f'{r["source"]}/{r["group"]}' for r in rows])
    units = [np.flatnonzero(g == u) for u in np.unique(g)]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = np.concatenate([units[j] for j in rng.integers(0, len(units), len(units))])
        vals.append(roc_auc(y[i], sa[i]) - roc_auc(y[i], sb[i]))
    return {"difference": float(roc_auc(y, sa) - roc_auc(y, sb)),
            "ci95": [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]}


def ship_rule(ch: dict, v2: dict) -> dict[str, Any]:
    """Criterion 1 by point estimate; every other criterion: not worse beyond v2's 95% interval."""
    checks = {"1 pooled abnormal AUC higher": ch["pooled"]["auc"] > v2["pooled"]["auc"]}
    for h in AUC_HOLDOUTS:
        lo = v2["per_holdout"][h]["ci95"][0]
        checks[f"2 AUC {h} >= v2's lower bound {lo:.3f}"] = not (ch["per_holdout"][h]["auc"] < lo)
    for h, r in ch["urgent_on_normals"].items():
        hi = v2["urgent_on_normals"][h]["ci95"][1]
        checks[f"3 normals urgent {h} <= v2's upper bound {hi:.3f}"] = not (r["value"] > hi)
    for h, r in ch["abnormal_flagged"].items():
        lo = v2["abnormal_flagged"][h]["ci95"][0]
        checks[f"4 abnormal flagged {h} >= v2's lower bound {lo:.3f}"] = not (r["value"] < lo)
    for h, r in ch.get("refused", {}).items():
        hi = v2["refused"][h]["ci95"][1]
        checks[f"5 refused {h} <= v2's upper bound {hi:.3f}"] = not (r["value"] > hi)
    return {"checks": checks, "ships": all(checks.values())}


def gate_ratio(rows: Sequence[dict], folds: dict, percentile: float = 97.5) -> dict[str, float]:
    """Per hold-out: the ``percentile`` of its held-out films' scores over its fold gate's threshold."""
    out = {}
    for h in HOLDOUTS:
        sc = np.array([float(r["gate_score"]) for r in rows if r["holdout"] == h])
        if len(sc):
            out[h] = float(np.percentile(sc, percentile) / folds[h]["gate"]["threshold"])
    return out


def crossfit_gate(dev: Sequence[dict], folds: dict) -> dict[str, Any]:
    """Amendment 2: each hold-out's gate threshold times the largest ratio over the other hold-outs."""
    ratio = gate_ratio(dev, folds)
    factor = {h: max(v for g, v in ratio.items() if g != h) for h in HOLDOUTS}
    return {"ratio": ratio, "factor": factor, "shipped_factor": max(ratio.values()),
            "threshold": {h: folds[h]["gate"]["threshold"] * factor[h] for h in HOLDOUTS}}


def apply_crossfit_gate(rows: Sequence[dict], cg: dict) -> list[dict]:
    return [dict(r, gate_crossfit_refused="1" if float(r["gate_score"]) > cg["threshold"][r["holdout"]] else "0")
            for r in rows]


def cmd_decide(args: argparse.Namespace) -> dict:
    lso = Path(args.lso)
    rep = json.loads((lso / "report.json").read_text())
    ch = rep["challenger"]
    folds = json.loads((lso / "folds.json").read_text())
    dev = read_csv(lso / "predictions-dev.csv")
    test = read_csv(Path(args.test_predictions))
    cg = crossfit_gate(dev, folds)
    dev, test = apply_crossfit_gate(dev, cg), apply_crossfit_gate(test, cg)
    th: dict[str, dict[str, float]] = {}
    for col in (ch, "v2"):
        th[col] = {h: crossfit_threshold([r for r in dev if r["holdout"] != h], col) for h in HOLDOUTS}
        th[col]["shipped"] = crossfit_threshold(dev, col)
    shipped_v2 = {h: float(args.v2_threshold) for h in HOLDOUTS}
    out: dict[str, Any] = {"challenger": ch, "target_sensitivity": TARGET_SENSITIVITY, "thresholds": th,
                           "candidates_run": rep.get("candidates_run"), "candidates_not_run": rep.get("candidates_not_run"),
                           "development_report": rep["candidates"], "gate_crossfit": cg}
    for name, rows in (("test", test), ("development", dev)):
        c = criteria(rows, ch, th[ch], args.n_boot, "gate_refused")
        v = criteria(rows, "v2", th["v2"], args.n_boot, "v2_gate_refused")
        v_shipped = criteria(rows, "v2_covid", shipped_v2, args.n_boot, None)
        c["refused_crossfit_gate"] = {h: _rate([r for r in rows if r["holdout"] == h],
                                               lambda r: r["gate_crossfit_refused"] == "1") for h in HOLDOUTS}
        out[name] = {"challenger": c, "v2": v, "v2_as_shipped_covid_threshold": {
            k: v_shipped[k] for k in ("urgent_on_normals", "abnormal_flagged")},
            "pooled_auc_difference": paired_auc_difference(rows, ch, "v2", args.n_boot),
            "ship_rule": ship_rule(c, v)}
    out["decision"] = "v5 ships" if out["test"]["ship_rule"]["ships"] else "v5 does not ship"
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "decision.json").write_text(json.dumps(_plain(out), indent=1) + "\n", encoding="utf-8")
    (dest / "decision.md").write_text(decision_markdown(out), encoding="utf-8")
    print(decision_markdown(out))
    return out


def _fmt(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['value']:.3f} [{lo:.3f}, {hi:.3f}] ({r['k']}/{r['n']})"


def _fa(r: dict) -> str:
    if r["auc"] is None or (isinstance(r["auc"], float) and math.isnan(r["auc"])):
        return "-"
    lo, hi = r["ci95"]
    return f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}] ({r['n_pos']}+/{r['n_neg']}-)"


def decision_markdown(out: dict) -> str:
    ch = out["challenger"]
    lines = [f"# v5 decision: {out['decision']}", "",
             f"Candidates run: {', '.join(out['candidates_run'] or [])}; not run: "
             f"{', '.join(out['candidates_not_run'] or []) or 'none'}. Development pooled AUC: " + ", ".join(
                 f"{k} {v['pooled']['auc']:.3f}" for k, v in out["development_report"].items()) + ".", "",
             f"Challenger `{ch}` (chosen on development figures) against the bundled v2 (1 - p(Normal)); "
             f"cross-fitted operating points (mean per-source sensitivity >= {out['target_sensitivity']:.2f} on the "
             "other hold-outs' development films). Shipped operating point (every hold-out's development films): "
             f"{ch} {out['thresholds'][ch]['shipped']:.3f}, v2 {out['thresholds']['v2']['shipped']:.3f}.", ""]
    for name in ("test", "development"):
        t = out[name]
        c, v = t["challenger"], t["v2"]
        d = t["pooled_auc_difference"]
        lines += [f"## {name} films" + (" (opened once)" if name == "test" else " (train+val of the held-out sources)"),
                  "", "| criterion | v5 challenger | v2 |", "|---|---|---|",
                  f"| 1. pooled abnormal AUC | {_fa(c['pooled'])} | {_fa(v['pooled'])} |",
                  f"| 1'. difference (paired bootstrap) | {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | |"]
        lines += [f"| 2. AUC {h} | {_fa(c['per_holdout'][h])} | {_fa(v['per_holdout'][h])} |" for h in AUC_HOLDOUTS]
        lines += [f"| 3. normals urgent: {h} | {_fmt(c['urgent_on_normals'][h])} | {_fmt(v['urgent_on_normals'][h])} |"
                  for h in c["urgent_on_normals"]]
        lines += [f"| 4. abnormal flagged: {h} | {_fmt(c['abnormal_flagged'][h])} | {_fmt(v['abnormal_flagged'][h])} |"
                  for h in c["abnormal_flagged"]]
        lines += [f"| 5. refused by the gate: {h} | {_fmt(c['refused'][h])} | {_fmt(v['refused'][h])} |"
                  for h in c["refused"]]
        lines += [f"| 5'. refused, cross-fitted gate threshold (amendment 2): {h} | "
                  f"{_fmt(c['refused_crossfit_gate'][h])} | |" for h in c["refused_crossfit_gate"]]
        s = t["v2_as_shipped_covid_threshold"]
        lines += ["", f"v2 as shipped (p(COVID) >= its threshold): normals urgent pooled "
                  f"{_fmt(s['urgent_on_normals']['pooled'])}, abnormal flagged pooled {_fmt(s['abnormal_flagged']['pooled'])}.",
                  "", "Ship rule checks: " + "; ".join(f"{k}: {'yes' if ok else '**no**'}"
                                                      for k, ok in t["ship_rule"]["checks"].items()), ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> dict:
    """The challenger's head fitted on every source (train split; L2 on the val split), at the shipped
    operating point of ``decide``, written with the bundled weights into a new checkpoint, and the gate
    refitted on every source beside it (NAME.ood.pt, bound to the new sha256)."""
    import torch

    from cxr_node.model.abnormality import AbnormalityHead
    from cxr_node.model.checkpoint import atomic_torch_save, make_checkpoint, read_verified
    from cxr_node.model.infer import OOD_KIND, default_ood_path
    from training.lso import read_rows

    dec = json.loads(Path(args.decision).read_text())
    ch = dec["challenger"]
    fset, pool = ch.split("-")
    threshold = float(dec["thresholds"][ch]["shipped"])
    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude")]
    F = Features(Path(args.features))
    sources = POOLS[pool]
    cand = [r for r in rows if r["id"] in F.index and (not sources or r["source"] in sources)]
    tr = [r for r in cand if r["split"] == "train"]
    va = [r for r in cand if r["split"] == "val"]
    fit = fit_abnormal(F, fset, tr, va)
    layers = tuple(LAYERS[part] for part in FEATURE_SETS[fset])
    rule = (f"cross-fitted leave-source-out (training/results/v5): the highest threshold at which the mean "
            f"per-source share of abnormal films flagged is >= {TARGET_SENSITIVITY:.2f} over every hold-out's "
            "held-out train+val films")
    head = AbnormalityHead(fit["head"], layers, threshold, rule)
    base = read_verified(F.checkpoint)
    meta = dict(base["meta"])
    meta.update(version=args.version, abnormality=head.meta(),
                based_on={"version": base["meta"]["version"], "sha256": base["sha256"]},
                abnormality_fit={"candidate": ch, "l2": fit["l2"], "n_train": fit["n_train"], "n_val": fit["n_val"],
                                 "train_cells": fit["train_cells"], "val_mean_source_auc": fit["val_mean_source_auc"],
                                 "decision": dec["decision"]})
    ck = make_checkpoint({**base["state_dict"], **head.state_tensors()}, meta)
    out = Path(args.out)
    atomic_torch_save(ck, out)
    gtr = [r for r in rows if r["id"] in F.index and r["split"] == "train"]
    gva = [r for r in rows if r["id"] in F.index and r["split"] == "val"]
    gate = fit_gate(F, gtr, gva)
    factor = float(dec["gate_crossfit"]["shipped_factor"]) if args.gate_rule == "crossfit" else 1.0
    registered = gate["threshold"]
    gate["threshold"] = registered * factor
    ref_meta = {"kind": OOD_KIND, "version": f"{args.version}-ood", "classifier_sha256": ck["sha256"],
                "classifier_version": args.version, "feature_layer": LAYERS["final"], "threshold": gate["threshold"],
                "method": "min Mahalanobis distance to a source x label cell mean, shared Ledoit-Wolf covariance",
                "cells": gate["cells"], "fit_films": gate["fit_films"], "percentile": gate["percentile"],
                "per_source_percentile": gate["per_source_percentile"], "rule": args.gate_rule,
                "registered_threshold": registered, "crossfit_factor": factor}
    sd = {"means": torch.tensor(gate["means"], dtype=torch.float32),
          "precision": torch.tensor(gate["precision"], dtype=torch.float32)}
    atomic_torch_save(make_checkpoint(sd, ref_meta), default_ood_path(out))
    info = {"checkpoint": str(out), "sha256": ck["sha256"], "threshold": threshold, "l2": fit["l2"],
            "gate_threshold": gate["threshold"], "gate_cells": len(gate["cells"])}
    log.info("wrote %s and %s: %s", out, default_ood_path(out), info)
    return info


# --------------------------------------------------------------------------- probes


def cmd_probes(args: argparse.Namespace) -> dict:
    """Every probe family (training.probes) through the serving rules (lung fields, then the out-of-domain
    score), under each named checkpoint's gate; counts refused in all and by the score alone."""
    import torch

    from cxr_node.config import BUNDLED_LUNG_CHECKPOINT, BUNDLED_MODELS
    from cxr_node.eligibility.refusal import RefusalCode
    from cxr_node.eligibility.rules import pixel_reason
    from cxr_node.model.checkpoint import load_checkpoint
    from cxr_node.model.infer import OodReference, default_ood_path
    from cxr_node.model.lungs import LungSegmenter
    from training.ood import features_and_lungs
    from training.probes import write_probes

    torch.set_num_threads(args.threads)
    inv = sorted(Path(args.inversion_films).glob("*.png"))[:6] if args.inversion_films else []
    made = write_probes(Path(args.work), {"val": inv[:3], "test": inv[3:]},
                        dicom_samples=Path(args.dicom_samples) if args.dicom_samples else None,
                        laterals=Path(args.laterals) if args.laterals else None)
    seg = LungSegmenter(BUNDLED_LUNG_CHECKPOINT)
    model, meta = load_checkpoint(BUNDLED_MODELS["v2"])  # the same backbone under every gate
    refs = {name: OodReference(default_ood_path(BUNDLED_MODELS[name])) for name in args.models.split(",")}
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        for kind, paths in made[split].items():
            f, lungs, kept = features_and_lungs(paths[:40], model, meta["preprocess"], seg, LAYERS["final"], kind)
            row: dict[str, Any] = {"n": len(kept)}
            for name, ref in refs.items():
                sc = ref.score(torch.as_tensor(f))
                rs = [pixel_reason(lf, float(x), ref.threshold) for lf, x in zip(lungs, sc)]
                row[name] = sum(r is not None for r in rs)
                row[f"{name}_by_score"] = sum(r is not None and r.code == RefusalCode.OUT_OF_DOMAIN for r in rs)
            out[f"{split}: {kind}"] = row
            log.info("%s %s: %s", split, kind, row)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(prog="python -m training.abnormal", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="pooled features of three layers and the logits of the bundled model")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--cache-dir", default="runs/v5/cache")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("lso", help="candidates and v2 on every hold-out; development report and the choice")
    q.add_argument("--manifest", required=True)
    q.add_argument("--features", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--test-out", required=True, help="test-split predictions (read only by decide)")
    q.add_argument("--candidates", default=",".join(CANDIDATES), help="which, in this order")
    q.add_argument("--resume", action="store_true", help="keep the candidates already in the files")
    q.add_argument("--n-boot", type=int, default=1000)
    d = sub.add_parser("decide", help="cross-fitted operating points and the test-split criteria (once)")
    d.add_argument("--lso", required=True, help="the lso --out folder")
    d.add_argument("--test-predictions", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--v2-threshold", type=float, default=0.261, help="v2's shipped COVID threshold")
    d.add_argument("--n-boot", type=int, default=1000)
    x = sub.add_parser("export", help="the final head and gate, written beside the bundled weights")
    x.add_argument("--manifest", required=True)
    x.add_argument("--features", required=True)
    x.add_argument("--decision", required=True, help="decide's decision.json")
    x.add_argument("--out", required=True, help="the new checkpoint (NAME.pt; the gate goes to NAME.ood.pt)")
    x.add_argument("--version", default="densenet121-128-v5-abnormal")
    x.add_argument("--gate-rule", choices=["registered", "crossfit"], default="crossfit")
    b = sub.add_parser("probes", help="probe families through the serving rules under each bundled gate")
    b.add_argument("--work", default="runs/v5/probes")
    b.add_argument("--out", required=True)
    b.add_argument("--models", default="v2,v5")
    b.add_argument("--inversion-films", help="a folder of frontal PNGs to invert (inverted-film probes)")
    b.add_argument("--dicom-samples", help="folder with dx_image.dcm (the dog thorax)")
    b.add_argument("--laterals", help="folder of lateral chest views")
    b.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    {"extract": cmd_extract, "lso": cmd_lso, "decide": cmd_decide, "export": cmd_export,
     "probes": cmd_probes}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
