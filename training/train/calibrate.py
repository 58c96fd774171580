"""Calibrate a checkpoint on the VALIDATION split: temperature scaling + per-class operating points.

    python -m training.train.calibrate --checkpoint RUN/best.pt --data DIR_OR_MANIFEST [--out RUN/calibrated.pt]

* temperature T minimises the validation negative log-likelihood of ``softmax(logits / T)``;
* the critical class (``meta["critical_labels"]``, COVID by default) gets the highest threshold
  whose validation sensitivity is >= ``--target-sensitivity`` (0.95);
* every other class gets the threshold maximising Youden's J (sensitivity + specificity - 1).

Safety margins for the critical threshold (``--sensitivity-rule``): ``point`` (above; it sits at
the edge, so on new films sensitivity scatters around the target), ``margin`` (the target plus
``--margin``), ``wilson`` (the highest threshold whose sensitivity's lower Wilson 95% bound reaches
the target). ``--lso-predictions`` chooses the critical threshold on pooled leave-source-out
predictions (``python -m training.evaluate.lso run``: ``predictions.csv``) instead of the validation split:
they show how the probability behaves on hospitals the model did not see. They come from the LSO
fold models, not from this checkpoint, so the threshold is an estimate for a model trained the
same way; the temperature is still fitted on validation.

Both are written into the checkpoint metadata (``temperature``, ``thresholds``, ``calibration``);
the weights and their sha256 are unchanged. The test split is never read here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger("training.train.calibrate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train.calibrate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint to calibrate (e.g. RUN/best.pt)")
    p.add_argument("--data", required=True, help="the training data (folder-per-class dir or manifest CSV)")
    p.add_argument("--out", default=None, help="write the calibrated checkpoint here (default: overwrite --checkpoint)")
    p.add_argument("--split-file", default=None, help="split.csv (default: next to the checkpoint)")
    p.add_argument("--split", default="val", help="split to calibrate on (default val; never test)")
    p.add_argument("--critical", action="append", default=None,
                   help="critical class(es) (default: the checkpoint's critical_labels)")
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument("--sensitivity-rule", choices=["point", "margin", "wilson"], default="point",
                   help="critical threshold: point (sensitivity >= target, default), margin (>= target + "
                   "--margin), wilson (lower Wilson 95%% bound >= target)")
    p.add_argument("--margin", type=float, default=0.0, help="safety margin for --sensitivity-rule margin")
    p.add_argument("--lso-predictions", default=None, metavar="CSV",
                   help="choose the critical threshold on these pooled leave-source-out predictions "
                   "(training.evaluate.lso run's predictions.csv) instead of the validation split")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", default=None, help="uint8 preprocessing cache folder (default: a temp dir)")
    p.add_argument("--film-pack", default=None, metavar="FILE", help="read preprocessed films from this pack (python -m training.data.pack) instead of the source images")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def calibrate(args: argparse.Namespace) -> dict:
    from cxr_node.model.calibration import binary_stats, fit_operating_points
    from cxr_node.model.checkpoint import read_checkpoint, save_checkpoint
    from training.common import split_logits

    if args.split == "test":
        raise SystemExit("calibrating on the test split would leak it into the operating points; use val")
    ckpt = Path(args.checkpoint)
    meta, labels, _, y, logits = split_logits(args)
    critical = ([n.strip() for item in args.critical for n in item.split(",") if n.strip()] if args.critical
                else list(meta.get("critical_labels") or []))
    for c in critical:
        if c not in labels:
            raise SystemExit(f"--critical {c!r} is not a label ({', '.join(labels)})")
    rule_name = getattr(args, "sensitivity_rule", "point")
    margin = float(getattr(args, "margin", 0.0) or 0.0)
    lso = read_lso_predictions(Path(args.lso_predictions), critical) if getattr(args, "lso_predictions", None) else {}
    # the same code as `cxr-node calibrate-site` (cxr_node.model.calibration)
    fit = fit_operating_points(logits, y, labels, critical, args.target_sensitivity, rule_name, margin,
                               critical_scores=lso, log=log)
    t, thresholds, points = fit["temperature"], fit["thresholds"], fit["operating_points"]
    for name in lso:
        if name in thresholds:
            ly, ls = lso[name]
            st_lso = binary_stats(ly, ls >= thresholds[name])
            points[name]["rule"] = points[name]["rule"].replace(
                f"on {len(ly)} other predictions", f"on {len(ly)} pooled LSO predictions ({args.lso_predictions})")
            log.info("%s: LSO threshold %.4f -> LSO sensitivity %.3f specificity %.3f", name, thresholds[name],
                     st_lso["sensitivity"], st_lso["specificity"])
    cal = {"split": args.split, "n": fit["n"], "temperature": t, "nll_before": fit["nll_before"],
           "nll_after": fit["nll_after"], "ece_before": fit["ece_before"], "ece_after": fit["ece_after"],
           "target_sensitivity": args.target_sensitivity, "sensitivity_rule": rule_name, "margin": margin,
           "lso_predictions": getattr(args, "lso_predictions", None), "operating_points": points}
    log.info("temperature %.4f: val NLL %.4f -> %.4f, ECE %.4f -> %.4f", t, cal["nll_before"], cal["nll_after"],
             cal["ece_before"], cal["ece_after"])
    raw = read_checkpoint(ckpt)
    new_meta = dict(raw["meta"], temperature=t, thresholds=thresholds, critical_labels=critical,
                    calibration=cal, calibrated=True)
    out = Path(args.out) if args.out else ckpt
    save_checkpoint(out, raw["state_dict"], new_meta)
    log.info("wrote calibrated checkpoint %s", out)
    return cal


def read_lso_predictions(path: Path, critical: Sequence[str]) -> dict[str, tuple]:
    """critical label -> (is that label, its probability) from a training.evaluate.lso predictions.csv."""
    import csv

    import numpy as np

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for c in critical:
        if not rows or f"p_{c}" not in rows[0]:
            raise SystemExit(f"--lso-predictions {path}: no p_{c} column")
        y = np.array([r["label"] == c for r in rows])
        if not y.any():
            raise SystemExit(f"--lso-predictions {path}: no {c} films")
        out[c] = (y, np.array([float(r[f"p_{c}"]) for r in rows]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.film_pack:
        from training.data import records as D

        D.use_pack(args.film_pack)
    cal = calibrate(args)
    sys.stdout.write(json.dumps(cal, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
