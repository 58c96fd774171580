"""``cxr-node calibrate-site``: a station's own temperature and operating points (on a model with an
abnormality output: its operating point on p(abnormal)), from its labelled films
(cxr_node.onboarding.site_calibration); ``--rollback`` restores the previous one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from cxr_node.cli._db import open_database
from cxr_node.config import Settings
from cxr_node.errors import ConfigError


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("calibrate-site", parents=[common], help="fit a station's own temperature and operating "
                       "points on its labelled films", description="Fits temperature scaling and per-class "
                       "operating points (the critical class at --target-sensitivity, the others at max Youden "
                       "J) on the station's films that readers labelled (cxr-node feedback), with the same code "
                       "that calibrated the model; on a model with an abnormality output, the operating point on "
                       "p(abnormal) instead (the highest threshold keeping sensitivity on the station's abnormal "
                       "films >= --target-sensitivity; Normal / Abnormal labels are enough). Refuses below --min-per-class labelled films of any class. "
                       "Prints before/after figures with 95%% intervals; once confirmed, stores a new version, "
                       "bound to the model's weights (a new model ignores it), audited. The daemon uses it for "
                       "the station's next films; their SR and Secondary Capture name it.")
    p.add_argument("--station", required=True, metavar="NAME_OR_AE")
    p.add_argument("--target-sensitivity", type=float, metavar="S",
                   help="for the critical class(es) (default [onboarding] target_sensitivity)")
    p.add_argument("--min-per-class", type=int, metavar="N", help="labelled films needed of every class "
                   "(default [onboarding] min_per_class)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, store nothing")
    p.add_argument("--yes", action="store_true", help="store without asking (needed when not on a terminal)")
    p.add_argument("--rollback", action="store_true", help="retire the active site calibration and restore "
                   "the previous version (or the model's own operating points)")
    p.add_argument("--store-anyway", action="store_true",
                   help="store a fit that calibrate-site refuses as unsupported by the labels (a temperature or "
                   "threshold at the edge, too wide a bootstrap interval); the reasons are printed and audited. "
                   "For trials, not for a station whose results people read")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.cli.performance import station_name
    from cxr_node.onboarding import site_calibration as sc
    from cxr_node.onboarding.stations import calibration_name

    station = station_name(settings, args.station)
    if not (args.rollback or args.dry_run or args.yes or sys.stdin.isatty()):
        raise ConfigError("calibrate-site: not on a terminal: add --yes to store the calibration (or --dry-run)")
    o = settings.onboarding
    target = args.target_sensitivity if args.target_sensitivity is not None else o.target_sensitivity
    minimum = args.min_per_class if args.min_per_class is not None else o.min_per_class
    if not 0.5 <= target <= 1.0:
        raise ConfigError(f"--target-sensitivity must be from 0.5 to 1 (got {target})")
    if minimum < 1:
        raise ConfigError(f"--min-per-class must be at least 1 (got {minimum})")
    with open_database(settings) as db:
        if args.rollback:
            cur, prev = sc.rollback(db, station)
            out.write(f"station {station}: {calibration_name(cur)} retired; films are now triaged with "
                      f"{calibration_name(prev)} operating points\n")
            return 0
        model = sc.ModelInfo.from_checkpoint(settings.model.checkpoint)
        with db.session() as s:
            current = sc.active(s, station)
            if current is not None and current.weights_sha256 != model.weights_sha256:
                current = None  # fitted for other weights: not in force
            result = sc.fit(s, station, model, target_sensitivity=target, min_per_class=minimum, current=current,
                            store_anyway=args.store_anyway)
        if args.format == "json":
            json.dump({k: v for k, v in sc.json_safe(result).items() if k != "reference"}, out, indent=1)
            out.write("\n")
        else:
            write_result(result, out)
        for why in result.get("refusals_overridden") or []:
            sys.stderr.write(f"cxr-node: warning: stored although {why} (--store-anyway)\n")
        if args.dry_run:
            out.write("nothing stored (--dry-run)\n")
            return 0
        if not args.yes:
            answer = input(f"store this as station {station}'s calibration and use it from now on? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                out.write("nothing stored\n")
                return 1
        row = sc.store(db, result)
        out.write(f"station {station}: {calibration_name(row)} stored and active (model {row.model_version}, "
                  f"weights {row.weights_sha256[:12]}); `cxr-node calibrate-site --station {station} --rollback` "
                  "undoes it\n")
    return 0


def _r(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    return f"{r['value']:.3f} [{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}] ({r['k']}/{r['n']})"


def write_result(res: dict, out: TextIO) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in res["counts"].items())
    out.write(f"station {res['station']}: {res['films']} labelled film(s) ({counts}), model {res['model_version']}\n")
    if "abnormal" in res:
        write_abnormal(res, out)
        return
    b, a = res["before"], res["after"]
    out.write(f"temperature {b['temperature']:.4f} -> {a['temperature']:.4f}; ECE "
              f"{b['ece'] if b['ece'] is None else round(b['ece'], 4)} -> "
              f"{a['ece'] if a['ece'] is None else round(a['ece'], 4)}\n")
    out.write(f"{'':18}{'before (' + b['calibration'] + ')':46}after (this calibration)\n")
    for name, after in a["per_class"].items():
        before = b["per_class"].get(name)
        bt = f"{before['threshold']:.4f}" if before else "-"
        out.write(f"{name[:16]:18}threshold {bt:37}threshold {after['threshold']:.4f}  "
                  f"({res['operating_points'][name]['rule']})\n")
        for k in ("sensitivity", "specificity"):
            out.write(f"{'  ' + k:18}{_r(before[k] if before else None):46}{_r(after[k])}\n")
    if "urgent_flag" in a:
        out.write("urgent flag\n")
        for k in ("sensitivity", "specificity"):
            out.write(f"{'  ' + k:18}{_r(b.get('urgent_flag', {}).get(k)):46}{_r(a['urgent_flag'][k])}\n")
    out.write(f"({res['note']}; `cxr-node performance --station {res['station']}` measures films triaged after it)\n")


def write_abnormal(res: dict, out: TextIO) -> None:
    """A model with an abnormality output: the operating point on p(abnormal), before and after."""
    b, a, abn = res["before"], res["after"], res["abnormal"]
    skipped = ", ".join(f"{k} {v}" for k, v in abn["skipped"].items() if v)
    if skipped:
        out.write(f"not used: {skipped}\n")
    auc = a["auc"]
    if auc["value"] is not None:
        out.write(f"p(abnormal) AUC on these films {auc['value']:.3f} [{auc['ci95'][0]:.2f}-{auc['ci95'][1]:.2f}]\n")
    out.write(f"{'':18}{'before (' + b['calibration'] + ')':46}after (this calibration)\n")
    out.write(f"{'operating point':18}{b['threshold']:<46.4f}{a['threshold']:.4f}  ({abn['rule']})\n")
    for k in ("sensitivity", "specificity", "flagged"):
        out.write(f"{'  ' + k:18}{_r(b[k]):46}{_r(a[k])}\n")
    out.write(f"({res['note']}; `cxr-node performance --station {res['station']}` measures films triaged after it)\n")
