"""The frozen-feature configuration of the v4 protocol (training/results/v4/PROTOCOL.md).

    # 1. every film once through the bundled model: its pooled penultimate features and its logits
    python -m training.evaluate.frozen extract --manifest runs/v4/merged.csv --out runs/v4/frozen/features.npz \\
        --cap covid19-radiography:train=600 --cap covid19-radiography:val=150 --degrade openist --degrade nih
    # 2. leave-source-out with each recipe as a logistic head on those features, plus the bundled model
    python -m training.evaluate.frozen lso --manifest runs/v4/merged.csv --features runs/v4/frozen/features.npz \\
        --recipe v4 --out training/results/v4/frozen/lso-v4-recipe
    # 3. TB on a grouped Shenzhen split (5-fold by patient), the v4 head
    python -m training.evaluate.frozen shenzhen-cv --manifest ... --features ... --out training/results/v4/frozen/shenzhen-cv

Recipes (heads; the backbone is the bundled v2 model's, unchanged):
  * ``v2-bundled``: the bundled model as shipped (its own head, temperature and thresholds);
  * ``v2``: a head on covid19-radiography only, COVID / Normal / Viral Pneumonia, class-weighted;
  * ``v3``: + hannover, nih, ieee8023, + Other pneumonia, balanced over source x class;
  * ``v4``: + nlm-shenzhen-tb and openist-normal, + Tuberculosis (critical), balanced over source x class.
Each fold (``training.evaluate.lso`` hold-out rules): the head on the other sources' train split, L2 chosen on
their val split by macro AUC, temperature and operating points on that val split (critical classes:
highest threshold with sensitivity >= 0.95, as ``training.train.calibrate``). Films whose copy is in
covid19-radiography (the backbone's training folder) are never predicted. ``--degrade SOURCE``
adds a copy of that source's Normal films squashed to 128x128 (as the Shenzhen films were
published) and reports, per hold-out, p(TB) and the urgent rate on them against the originals.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("training.evaluate.frozen")

RECIPES: dict[str, dict[str, Any]] = {
    "v2": {"sources": ["covid19-radiography"], "labels": ["COVID", "Normal", "Viral Pneumonia"],
           "critical": ["COVID"], "balance": "class-weights"},
    "v3": {"sources": ["covid19-radiography", "hannover", "nih", "ieee8023"],
           "labels": ["COVID", "Normal", "Other pneumonia", "Viral Pneumonia"], "critical": ["COVID"],
           "balance": "source,class"},
    "v4": {"sources": None, "labels": ["COVID", "Normal", "Other pneumonia", "Tuberculosis", "Viral Pneumonia"],
           "critical": ["COVID", "Tuberculosis"], "balance": "source,class"},
}
L2_GRID = (100.0, 10.0, 1.0)  # inverse of C = 0.01, 0.1, 1
DEGRADED = "#as-shenzhen"


# --------------------------------------------------------------------------- extraction


def _degrade(src: str, dst: Path) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("L").resize((128, 128), Image.BILINEAR).save(dst)


def cmd_extract(args: argparse.Namespace) -> None:
    import torch

    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.checkpoint import load_checkpoint
    from cxr_node.model.infer import FEATURE_LAYERS
    from training.common import predict_logits
    from training.data import records as D
    from training.evaluate.lso.folds import read_rows

    torch.set_num_threads(args.threads)
    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude") and r["split"] in args.splits.split(",")]
    rng = np.random.default_rng(args.seed)
    caps = {}
    for c in args.cap:
        key, n = c.split("=")
        caps[tuple(key.split(":"))] = int(n)
    keep = []
    for (src, split), n in caps.items():
        for lab in sorted({r["label"] for r in rows if r["source"] == src}):
            cell = [r for r in rows if r["source"] == src and r["split"] == split and r["label"] == lab]
            if len(cell) > n:
                chosen = set(rng.choice(len(cell), n, replace=False).tolist())
                drop = {cell[i]["id"] for i in range(len(cell)) if i not in chosen}
                rows = [r for r in rows if r["id"] not in drop]
    keep = rows
    degraded = []
    for src in args.degrade:
        for r in keep:
            if r["source"] == src and r["label"] == "Normal":
                dst = Path(args.out).parent / "degraded" / src / (Path(r["abspath"]).stem + ".png")
                if not dst.is_file():
                    _degrade(r["abspath"], dst)
                degraded.append(dict(r, id=r["id"] + DEGRADED, abspath=str(dst)))
    allr = keep + degraded
    ck = Path(args.checkpoint) if args.checkpoint else BUNDLED_CHECKPOINT
    model, meta = load_checkpoint(ck, torch.device("cpu"))
    feats: list[np.ndarray] = []
    layer = dict(model.named_modules())[FEATURE_LAYERS[meta["arch"]]]
    layer.register_forward_hook(lambda m, a, o: feats.append(o.detach().float().numpy().copy()))
    recs = [D.Record(r["abspath"], r["label"], r["group"], r["abspath"]) for r in allr]
    cache = D.build_cache(recs, meta["preprocess"], Path(args.cache_dir))
    log.info("%d films (%d degraded copies) through %s", len(allr), len(degraded), meta["version"])
    logits = predict_logits(model, cache, range(len(recs)), meta["preprocess"], torch.device("cpu"), batch_size=64)
    f = np.concatenate(feats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, ids=np.array([r["id"] for r in allr]), features=f.astype(np.float32),
                        logits=logits.astype(np.float32), labels=np.array(meta["labels"]),
                        weights_sha256=np.array(str(meta.get("weights_sha256") or "")), checkpoint=np.array(str(ck)),
                        version=np.array(str(meta["version"])))
    log.info("wrote %s: features %s", out, f.shape)


# --------------------------------------------------------------------------- heads per fold


def load_features(path: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray, list[str]]:
    z = np.load(path)
    ids = [str(x) for x in z["ids"]]
    return {i: k for k, i in enumerate(ids)}, z["features"], z["logits"], [str(x) for x in z["labels"]]


def seen_copies(rows: Sequence[dict[str, str]]) -> set[str]:
    """Ids of kept films that are copies of a covid19-radiography film (the backbone trained on it)."""
    return {r["duplicate_of"] for r in rows if r["source"] == "covid19-radiography" and r.get("duplicate_of")}


def fit_head(recipe: dict, tr: list[dict], va: list[dict], index: dict[str, int], X: np.ndarray,
             target: float = 0.95) -> dict[str, Any]:
    """The recipe's head on ``tr`` (L2 by val macro AUC), then temperature and operating points on ``va``."""
    from cxr_node.model.adaptation import balanced_weights, fit_logistic_head
    from cxr_node.model.calibration import fit_operating_points, macro_auc, softmax

    labels = sorted({r["label"] for r in tr})
    crit = [c for c in recipe["critical"] if c in labels]
    xt = X[[index[r["id"]] for r in tr]]
    yt = np.array([labels.index(r["label"]) for r in tr])
    va = [r for r in va if r["label"] in labels]
    xv = X[[index[r["id"]] for r in va]]
    yv = np.array([labels.index(r["label"]) for r in va])
    w = balanced_weights([r["label"] for r in tr], [r["source"] for r in tr] if recipe["balance"] == "source,class"
                         else None)
    best = None
    for l2 in L2_GRID:
        head = fit_logistic_head(xt, yt, labels, l2=l2, weights=w)
        auc = macro_auc(yv, softmax(head.logits(xv)))
        log.info("  l2 %g: val macro AUC %.4f", l2, auc)
        if best is None or auc > best[0] + 1e-6:
            best = (auc, head)
    auc, head = best
    op = fit_operating_points(head.logits(xv), yv, labels, crit, target, "point")
    return {"head": head, "labels": labels, "critical": crit, "val_macro_auc": float(auc),
            "temperature": op["temperature"], "thresholds": op["thresholds"], "l2": head.l2,
            "n_train": len(tr), "n_val": len(va),
            "train_counts": {f"{s}/{c}": n for (s, c), n in sorted(Counter((r["source"], r["label"]) for r in tr).items())}}


def predict_rows(fit: dict, rows: list[dict], index: dict[str, int], X: np.ndarray) -> np.ndarray:
    from cxr_node.model.calibration import softmax

    return softmax(fit["head"].logits(X[[index[r["id"]] for r in rows]]), fit["temperature"])


def _meta(fit: dict) -> dict:
    return {"labels": fit["labels"], "critical_labels": fit["critical"], "thresholds": fit["thresholds"]}


def degraded_summary(fold_fit: dict | None, rows: list[dict], index: dict[str, int], X: np.ndarray, L: np.ndarray,
                     bundled: dict | None) -> dict | None:
    """p(TB), urgent and top class on the originals and their squashed 128 px copies (paired)."""
    pairs = [r for r in rows if r["label"] == "Normal" and r["id"] + DEGRADED in index]
    if not pairs:
        return None
    from cxr_node.model.calibration import proportion, softmax

    twins = [dict(r, id=r["id"] + DEGRADED) for r in pairs]
    if fold_fit is not None:
        p0, p1 = predict_rows(fold_fit, pairs, index, X), predict_rows(fold_fit, twins, index, X)
        labels, crit, th = fold_fit["labels"], fold_fit["critical"], fold_fit["thresholds"]
    else:
        labels, crit, th = bundled["labels"], bundled["critical_labels"], bundled["thresholds"]
        p0 = softmax(L[[index[r["id"]] for r in pairs]], bundled["temperature"])
        p1 = softmax(L[[index[r["id"]] for r in twins]], bundled["temperature"])

    def urgent(p: np.ndarray) -> np.ndarray:
        return np.any([p[:, labels.index(c)] >= th[c] for c in crit], axis=0)

    out = {"films": len(pairs), "urgent_original": proportion(urgent(p0)), "urgent_as_shenzhen": proportion(urgent(p1)),
           "top_original": dict(Counter(labels[i] for i in p0.argmax(1))),
           "top_as_shenzhen": dict(Counter(labels[i] for i in p1.argmax(1)))}
    if "Tuberculosis" in labels:
        t = labels.index("Tuberculosis")
        out["mean_p_tb_original"] = float(p0[:, t].mean())
        out["mean_p_tb_as_shenzhen"] = float(p1[:, t].mean())
        out["tb_flagged_original"] = proportion(p0[:, t] >= th["Tuberculosis"])
        out["tb_flagged_as_shenzhen"] = proportion(p1[:, t] >= th["Tuberculosis"])
    return out


def bundled_meta(path: Path | None) -> dict:
    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.checkpoint import read_checkpoint

    m = read_checkpoint(path or BUNDLED_CHECKPOINT)["meta"]
    return {"labels": list(m["labels"]), "critical_labels": list(m["critical_labels"]),
            "thresholds": {k: float(v) for k, v in m["thresholds"].items()}, "temperature": float(m["temperature"]),
            "version": m["version"]}


def cmd_lso(args: argparse.Namespace) -> dict:
    from cxr_node.model.calibration import softmax
    from training.evaluate.lso.folds import (
        expand_holdouts,
        held_out,
        holdout_splits,
        read_predictions,
        read_rows,
        training_rows,
        write_predictions,
    )
    from training.evaluate.lso.report import write_report

    rows = read_rows(Path(args.manifest))
    index, X, L, _ = load_features(Path(args.features))
    seen = seen_copies(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_name = args.recipe
    all_labels = RECIPES["v4"]["labels"]
    crits = RECIPES["v4"]["critical"] if recipe_name == "v4" else ["COVID"]
    pred_files, folds = [], {}
    for h in expand_holdouts(args.holdout, rows):
        name = h.replace("site:", "site-").replace("/", "-").replace(" ", "_")
        test = [r for r in held_out(h, rows, holdout_splits(args.holdout_splits)) if r["id"] not in seen and r["id"] in index]
        pf = out / f"{name}-predictions.csv"
        if recipe_name == "v2-bundled":
            z = np.load(args.features)
            bm = bundled_meta(Path(str(z["checkpoint"])) if "checkpoint" in z.files else None)
            p = softmax(L[[index[r["id"]] for r in test]], bm["temperature"])
            write_predictions(pf, h, test, p, bm, all_labels, crits)
            folds[h] = {"n_test": len(test), "degraded": degraded_summary(None, test, index, X, L, bm)}
        else:
            recipe = RECIPES[recipe_name]
            cand = [r for r in training_rows(rows, held_out(h, rows), recipe["sources"] or [], recipe["labels"], None, 0)
                    if r["id"] in index]
            tr = [r for r in cand if r["split"] == "train"]
            va = [r for r in cand if r["split"] == "val"]
            log.info("%s hold-out %s: %d held-out films; head on %d, val %d", recipe_name, h, len(test), len(tr), len(va))
            fit = fit_head(recipe, tr, va, index, X)
            write_predictions(pf, h, test, predict_rows(fit, test, index, X), _meta(fit), all_labels, crits)
            folds[h] = {k: v for k, v in fit.items() if k != "head"}
            folds[h].update(n_test=len(test), degraded=degraded_summary(fit, test, index, X, L, None))
        pred_files.append(pf)
    (out / "folds.json").write_text(json.dumps(folds, indent=1) + "\n", encoding="utf-8")
    preds = read_predictions(pred_files)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(preds[0]))
        w.writeheader()
        w.writerows(preds)
    rep = write_report(out, preds, {"command": "frozen lso", "recipe": recipe_name, "features": str(args.features),
                                    "holdout_splits": args.holdout_splits, "folds": folds}, args.n_boot)
    return rep


def cmd_shenzhen_cv(args: argparse.Namespace) -> dict:
    """5-fold patient-grouped CV over Shenzhen's train+val films, the v4 head trained on every other
    source's train split plus Shenzhen's other folds (their builder split kept)."""
    from training.evaluate.lso.folds import read_predictions, read_rows, write_predictions
    from training.evaluate.lso.report import write_report

    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude") and r["split"] in ("train", "val")]
    index, X, _, _ = load_features(Path(args.features))
    rows = [r for r in rows if r["id"] in index]
    recipe = RECIPES["v4"]
    sz = [r for r in rows if r["source"] == "shenzhen"]
    groups = sorted({r["group"] for r in sz})
    rng = np.random.default_rng(args.seed)
    rng.shuffle(groups)
    fold_of = {g: i % args.folds for i, g in enumerate(groups)}
    others = [r for r in rows if r["source"] != "shenzhen"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, folds = [], {}
    for k in range(args.folds):
        test = [r for r in sz if fold_of[r["group"]] == k]
        rest = [r for r in sz if fold_of[r["group"]] != k]
        tr = [r for r in others + rest if r["split"] == "train"]
        va = [r for r in others + rest if r["split"] == "val"]
        fit = fit_head(recipe, tr, va, index, X)
        pf = out / f"fold{k}-predictions.csv"
        write_predictions(pf, "shenzhen-cv", test, predict_rows(fit, test, index, X), _meta(fit), recipe["labels"],
                          recipe["critical"])
        files.append(pf)
        folds[k] = {kk: v for kk, v in fit.items() if kk != "head"}
        folds[k]["n_test"] = len(test)
    preds = read_predictions(files)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(preds[0]))
        w.writeheader()
        w.writerows(preds)
    return write_report(out, preds, {"command": "frozen shenzhen-cv", "folds": folds, "seed": args.seed}, args.n_boot)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m training.evaluate.frozen", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="features and logits of the bundled model for a merged manifest's films")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True, help="features .npz")
    e.add_argument("--checkpoint", default=None, help="default: the bundled model")
    e.add_argument("--splits", default="train,val", help="builder splits to extract (default train,val)")
    e.add_argument("--cap", action="append", default=[], metavar="SOURCE:SPLIT=N", help="at most N films per label")
    e.add_argument("--degrade", action="append", default=[], metavar="SOURCE",
                   help="also extract this source's Normal films squashed to 128x128 (the Shenzhen films' form)")
    e.add_argument("--cache-dir", default="runs/v4/frozen/cache")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    for name in ("lso", "shenzhen-cv"):
        q = sub.add_parser(name)
        q.add_argument("--manifest", required=True)
        q.add_argument("--features", required=True)
        q.add_argument("--out", required=True)
        q.add_argument("--n-boot", type=int, default=1000)
        q.add_argument("--seed", type=int, default=0)
        if name == "lso":
            q.add_argument("--recipe", required=True, choices=["v2-bundled", *RECIPES])
            q.add_argument("--holdout", action="append", default=None)
            q.add_argument("--holdout-splits", default="train,val")
        else:
            q.add_argument("--folds", type=int, default=5)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    if args.cmd == "extract":
        cmd_extract(args)
    elif args.cmd == "lso":
        args.holdout = args.holdout or ["shenzhen", "openist", "nih", "ieee8023", "hannover"]
        cmd_lso(args)
    else:
        cmd_shenzhen_cv(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
