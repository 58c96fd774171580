"""``python -m training.evaluate.lso run|evaluate|report|crossfit``: train or take a model per hold-out,
predict it, report (the package's docstring says what each command does)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from training.evaluate import lso as package
from training.evaluate.lso.folds import (
    expand_holdouts,
    held_out,
    holdout_splits,
    predict,
    read_predictions,
    read_predictions_in,
    read_rows,
    training_rows,
    write_fold_manifest,
    write_predictions,
)
from training.evaluate.lso.report import cmd_crossfit, write_report

log = logging.getLogger("training.evaluate.lso")

# --------------------------------------------------------------------------- commands


def calibrate_fold(checkpoint: Path, fold_manifest: Path, split_file: Path, device: str, cache_dir: str | None,
                   threads: int | None, target: float, rule: str, margin: float) -> dict:
    """Temperature + critical threshold on the fold's validation split, written into the checkpoint."""
    ns = argparse.Namespace(checkpoint=str(checkpoint), data=str(fold_manifest), out=None, split_file=str(split_file),
                            split="val", critical=None, target_sensitivity=target, sensitivity_rule=rule,
                            margin=margin, lso_predictions=None, device=device, threads=threads, cache_dir=cache_dir)
    from training.train.calibrate import calibrate

    return calibrate(ns)


def cmd_run(args: argparse.Namespace) -> dict:
    from training.train.cli import build_parser as train_parser
    from training.train.loop import train

    manifest = Path(args.manifest).resolve()
    rows = read_rows(manifest)
    out = Path(args.out).resolve()
    holdouts = expand_holdouts(args.holdout, rows)
    labels = args.labels.split(",") if args.labels else None
    # one header for every fold's predictions: every label and critical class the recipe trains on
    all_labels = labels or sorted({r["label"] for r in rows if not r.get("exclude")})
    targs0 = train_parser().parse_args(["--data", "-", "--out", "-", *args.train_arg])
    from training.train.sampling import critical_classes

    criticals = critical_classes(targs0.critical, all_labels, warn=False)
    pred_files = []
    folds = {}
    for h in holdouts:
        test = held_out(h, rows, holdout_splits(args.holdout_splits))
        fold = out / h.replace("site:", "site-").replace("/", "-").replace(" ", "_")
        # training leaves out the whole hold-out (every split), its groups and its sites
        train_rows = training_rows(rows, held_out(h, rows), args.train_source, labels, args.max_per_source_class,
                                   args.seed)
        fm = write_fold_manifest(train_rows, fold / "train-manifest.csv")
        counts = Counter((r["split"], r["source"], r["label"]) for r in train_rows)
        log.info("hold-out %s: %d films held out; training on %d (%s)", h, len(test), len(train_rows),
                 ", ".join(f"{s}:{src}/{lab}={n}" for (s, src, lab), n in sorted(counts.items())))
        pf = fold / "predictions.csv"
        if args.resume and pf.is_file():
            log.info("hold-out %s: done in an earlier run (%s): kept", h, pf)
            pred_files.append(pf)
            done = fold / "fold.json"
            if done.is_file():
                folds[h] = json.loads(done.read_text(encoding="utf-8"))
            continue
        resume = ["--resume"] if args.resume and (fold / "run" / "last.pt").is_file() else []
        targs = train_parser().parse_args(["--data", str(fm), "--out", str(fold / "run"), *args.train_arg, *resume])
        t0 = time.perf_counter()
        res = train(targs)
        ck = fold / "run" / "best.pt"
        cal = calibrate_fold(ck, fm, fold / "run" / "split.csv", targs.device, targs.cache_dir, targs.threads,
                             args.target_sensitivity, args.sensitivity_rule, args.margin)
        test_keep = list(test)  # every held-out film, also those with labels the model lacks
        meta, p = predict(ck, test_keep, targs.device, targs.cache_dir, targs.threads)
        write_predictions(pf, h, test_keep, p, meta, all_labels, criticals)
        pred_files.append(pf)
        folds[h] = {"n_test": len(test_keep), "n_train": len(train_rows),
                    "best_val_macro_auc": res["best_val_macro_auc"],
                    "epochs": res["epochs"], "temperature": cal["temperature"],
                    "thresholds": {k: v["threshold"] for k, v in cal["operating_points"].items()},
                    "seconds": round(time.perf_counter() - t0, 1)}
        (fold / "fold.json").write_text(json.dumps(folds[h], indent=2) + "\n", encoding="utf-8")
    preds = read_predictions(pred_files)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in preds for k in r)), restval="")
        w.writeheader()
        w.writerows(preds)
    extra = {"command": "run", "manifest": str(manifest), "holdouts": holdouts, "holdout_splits": args.holdout_splits,
             "train_args": args.train_arg,
             "train_sources": args.train_source, "labels": labels, "max_per_source_class": args.max_per_source_class,
             "seed": args.seed, "folds": folds}
    return write_report(out, preds, extra, args.n_boot)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    manifest = Path(args.manifest).resolve()
    rows = read_rows(manifest)
    out = Path(args.out).resolve()
    holdouts = expand_holdouts(args.holdout, rows)
    seen = set(args.seen_source)
    # films that the checkpoint may have seen: kept copies of a seen source's film (duplicate_of),
    # and with --seen-by groups, everything sharing a group (patient) with a seen source's film
    copy_of_seen = {r["duplicate_of"] for r in rows if r["source"] in seen and r.get("duplicate_of")}
    seen_groups = {r["group"] for r in rows if r["source"] in seen}
    pred_files, dropped = [], {}
    for h in holdouts:
        test = held_out(h, rows, holdout_splits(args.holdout_splits))
        if h in seen or any(r["source"] in seen for r in test):
            raise SystemExit(f"hold-out {h} is a source the checkpoint was trained on (--seen-source)")
        keep = [r for r in test if r["id"] not in copy_of_seen
                and (args.seen_by == "copies" or r["group"] not in seen_groups)]
        dropped[h] = len(test) - len(keep)
        log.info("hold-out %s: %d films, %d left out as seen by the checkpoint (%s)", h, len(test), dropped[h],
                 args.seen_by)
        meta, p = predict(Path(args.checkpoint), keep, args.device, args.cache_dir, args.threads)
        pf = out / (h.replace("site:", "site-").replace("/", "-").replace(" ", "_") + "-predictions.csv")
        write_predictions(pf, h, keep, p, meta)
        pred_files.append(pf)
    preds = read_predictions(pred_files)
    extra = {"command": "evaluate", "holdout_splits": args.holdout_splits, "checkpoint": str(args.checkpoint),
             "model_version": meta.get("version"),
             "weights_sha256": meta.get("weights_sha256"), "manifest": str(manifest), "holdouts": holdouts,
             "seen_sources": sorted(seen), "seen_by": args.seen_by, "left_out_as_seen": dropped,
             "thresholds": meta.get("thresholds"), "temperature": meta.get("temperature")}
    return write_report(out, preds, extra, args.n_boot)



def build_parser() -> argparse.ArgumentParser:
    doc = package.__doc__ or ""
    p = argparse.ArgumentParser(prog="python -m training.evaluate.lso", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--manifest", required=True, help="merged manifest (python -m training.data.sources build)")
    common.add_argument("--out", required=True, help="output folder (report.json, report.md, predictions)")
    common.add_argument("--holdout", action="append", required=True,
                        help="source name, site:SITE, or ieee8023-countries; repeat for several")
    common.add_argument("--holdout-splits", default="train,val",
                        help="which of the builder's splits of a held-out source are predicted (default train,val: "
                        "the test split stays closed until the decision; 'test' once afterwards)")
    common.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for AUC intervals")
    common.add_argument("--film-pack", default=None, metavar="FILE", help="read preprocessed films from this pack (python -m training.data.pack) instead of the source images")
    common.add_argument("--log-level", default="INFO")
    r = sub.add_parser("run", parents=[common], help="train without each hold-out, predict it, report",
                       description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--train-source", action="append", default=[],
                   help="train only on these sources (default: every source but the hold-out)")
    r.add_argument("--labels", default=None, help="train only on films with these labels (comma-separated)")
    r.add_argument("--max-per-source-class", type=int, default=None, metavar="N",
                   help="cheap runs: at most N training films per source and label (val: 0.15/0.70 of N)")
    r.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="passed to training.train, e.g. --train-arg=--epochs=2 --train-arg=--augment=v3")
    r.add_argument("--target-sensitivity", type=float, default=0.95, help="critical-class threshold target on val")
    r.add_argument("--sensitivity-rule", choices=["point", "margin", "wilson"], default="point")
    r.add_argument("--margin", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=42, help="subsampling seed")
    r.add_argument("--resume", action="store_true",
                   help="keep hold-outs whose predictions.csv exists; continue a hold-out's training from its "
                        "last.pt (for long CPU runs that stop and start)")
    rp = sub.add_parser("report", help="re-make report.json / report.md from predictions CSVs (no model)")
    rp.add_argument("--predictions", nargs="+", required=True, help="predictions CSVs written by run or evaluate")
    rp.add_argument("--out", required=True)
    rp.add_argument("--splits", default="train,val,test",
                    help="report only predictions of films in these builder splits (default all; rows without a "
                    "split, from runs before the column existed, count as train)")
    rp.add_argument("--n-boot", type=int, default=1000)
    rp.add_argument("--log-level", default="INFO")
    cf = sub.add_parser("crossfit", help="operating points chosen on the other hold-outs' predictions, judged on "
                        "each hold-out (no model)")
    cf.add_argument("--predictions", nargs="+", required=True, help="predictions CSVs of at least two hold-outs")
    cf.add_argument("--out", required=True)
    cf.add_argument("--target-sensitivity", type=float, default=0.70,
                    help="critical-class sensitivity the threshold aims at (default 0.70, the issue's floor)")
    cf.add_argument("--sensitivity-rule", choices=["point", "margin", "wilson"], default="wilson")
    cf.add_argument("--margin", type=float, default=0.0)
    cf.add_argument("--no-temperature", action="store_true", help="keep each fold's own temperature")
    cf.add_argument("--fit-critical", action="append", default=[], metavar="CLASS=CSV",
                    help="a critical class whose films lie in one hold-out only (Tuberculosis) takes its threshold "
                    "from these predictions (its grouped cross-validation, e.g. training.evaluate.frozen's shenzhen-cv)")
    cf.add_argument("--splits", default="train,val,test",
                    help="use only predictions of films in these builder splits (default all; rows without a "
                    "split column count as train)")
    cf.add_argument("--n-boot", type=int, default=1000)
    cf.add_argument("--log-level", default="INFO")
    e = sub.add_parser("evaluate", parents=[common], help="one fixed checkpoint on the hold-outs (no training)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--seen-source", action="append", default=[],
                   help="source(s) the checkpoint was trained on: their films' copies are left out")
    e.add_argument("--seen-by", choices=["copies", "groups"], default="copies",
                   help="leave out copies of seen films (default) or every film sharing a dedup group "
                   "(patient, near-duplicate) with one")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--cache-dir", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if getattr(args, "film_pack", None):
        from training.data import records as D

        D.use_pack(args.film_pack)
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "report":
        preds = read_predictions_in([Path(p) for p in args.predictions], args.splits)
        write_report(Path(args.out), preds, {"command": "report", "predictions": [str(p) for p in args.predictions],
                                             "holdout_splits": args.splits}, args.n_boot)
    elif args.cmd == "crossfit":
        cmd_crossfit(args)
    else:
        cmd_evaluate(args)
    return 0
