"""Evaluate a checkpoint: ``python -m training.evaluate --checkpoint PATH --data DIR_OR_MANIFEST --out DIR``.

Writes DIR/metrics.json (accuracy, macro AUC with bootstrap 95% CI, macro F1, per class: AUC with
95% CI, sensitivity, specificity, PPV, NPV, F1 at the checkpoint's operating threshold, confusion
matrix, expected calibration error), DIR/predictions.csv, and PNG plots: roc.png,
confusion.png, reliability.png.

``--split test`` picks the held-out split from the split.csv saved next to the checkpoint (or
``--split-file``); the default ``all`` uses every image, e.g. an external folder-per-class set
whose class names are (a subset of) the checkpoint's labels. Tune on val; run the test split once.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("training.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="folder-per-class dir or manifest CSV")
    p.add_argument("--out", required=True, help="output folder for metrics.json and plots")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="which split of the saved split file (default all: every image)")
    p.add_argument("--split-file", default=None, help="split.csv (default: next to the checkpoint)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUC CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", default=None, help="uint8 preprocessing cache folder (default: a temp dir)")
    p.add_argument("--film-pack", default=None, metavar="FILE", help="read preprocessed films from this pack (python -m training.data.pack) instead of the source images")
    p.add_argument("--record-in-checkpoint", action="store_true",
                   help="also store the summary under meta['metrics'][SPLIT] in the checkpoint")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def plot_all(metrics: dict[str, Any], y: np.ndarray, p: np.ndarray, labels: Sequence[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(labels):
        if (y == k).any() and (y != k).any():
            fpr, tpr, _ = roc_curve(y == k, p[:, k])
            pc = metrics["per_class"][name]
            ax.plot(fpr, tpr, label=f"{name} AUC {pc['auc']:.3f} [{pc['auc_ci95'][0]:.3f}, {pc['auc_ci95'][1]:.3f}]")
            if "at_threshold" in pc:
                st = pc["at_threshold"]
                ax.plot(1 - st["specificity"], st["sensitivity"], "ko", ms=4)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC (n={metrics['n']}); dots: operating points")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    cm = np.array(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted (argmax)")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)

    rel = metrics["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = [(lo + hi) / 2 for lo, hi in zip(rel["bin_lower"], rel["bin_upper"])]
    acc = [a if a is not None else np.nan for a in rel["accuracy"]]
    ax.bar(centers, acc, width=1.0 / len(centers), edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, ECE {metrics['ece']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from cxr_node.model.checkpoint import read_checkpoint, save_checkpoint
    from training.common import split_logits
    from training.evaluate.metrics import softmax, summarize

    ckpt = Path(args.checkpoint)
    t0 = time.perf_counter()
    meta, labels, recs, y, logits = split_logits(args)
    p = softmax(logits, float(meta["temperature"]))
    m = summarize(y, p, labels, thresholds=meta.get("thresholds") or None, n_boot=args.n_boot, seed=args.seed)
    m.update({"checkpoint": str(ckpt), "model_version": meta["version"], "weights_sha256": meta["weights_sha256"],
              "temperature": float(meta["temperature"]), "thresholds": meta.get("thresholds"),
              "split": args.split, "data": str(args.data), "calibrated": bool(meta.get("calibrated")),
              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(time.perf_counter() - t0, 2)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "predicted", *[f"p_{n}" for n in labels]])
        for r, row in zip(recs, p):
            w.writerow([r.relpath, r.label, labels[int(row.argmax())], *[f"{v:.6f}" for v in row]])
    plot_all(m, y, p, labels, out)
    log.info("%s split %s (n=%d): accuracy %.4f, macro AUC %.4f [%.4f, %.4f], macro F1 %.4f, ECE %.4f",
             ckpt.name, args.split, m["n"], m["accuracy"], m["macro_auc"], *m["macro_auc_ci95"], m["macro_f1"], m["ece"])
    for name in labels:
        pc = m["per_class"][name]
        log.info("  %-16s AUC %.4f [%.4f, %.4f] sens %.3f spec %.3f PPV %.3f NPV %.3f F1 %.3f%s", name, pc["auc"],
                 *pc["auc_ci95"], pc["sensitivity"], pc["specificity"], pc["ppv"], pc["npv"], pc["f1"],
                 f" (threshold {pc['threshold']:.4f})" if "threshold" in pc else " (argmax)")
    if args.record_in_checkpoint:
        raw = read_checkpoint(ckpt)
        summary = {k: m[k] for k in ("n", "accuracy", "macro_auc", "macro_auc_ci95", "macro_f1", "ece",
                                     "evaluated_at")}
        summary["per_class"] = {n: {k: m["per_class"][n][k] for k in ("auc", "auc_ci95", "sensitivity",
                                                                       "specificity", "ppv", "npv", "f1")}
                                for n in labels}
        metrics = dict(raw["meta"].get("metrics") or {})
        metrics[args.split] = summary
        save_checkpoint(ckpt, raw["state_dict"], dict(raw["meta"], metrics=metrics))
        log.info("recorded %s metrics in %s", args.split, ckpt)
    return m


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.film_pack:
        from training.data import records as D

        D.use_pack(args.film_pack)
    evaluate(args)
    return 0
