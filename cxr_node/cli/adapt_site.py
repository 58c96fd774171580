"""``cxr-node adapt-site``: a station's own heads on the model's frozen features, from its labelled
films (cxr_node.onboarding.site_adaptation); champion/challenger gate; ``--rollback`` restores the previous."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from cxr_node.config import Settings
from cxr_node.errors import ConfigError


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("adapt-site", parents=[common], help="fit a station's own heads on the model's frozen "
                       "features from its labelled films (after calibrate-site)", description="For each critical "
                       "class, fits a logistic head on the model's frozen penultimate features of the station's "
                       "labelled films (cxr-node feedback), calibration folded in. Estimates before and after "
                       "(AUC, sensitivity and specificity) by patient-grouped cross-validation with 95%% intervals, "
                       "refuses below --min-per-class labelled films, and keeps a class's head only if the lower "
                       "bound of the paired AUC difference (head - model) is above zero (champion and "
                       "challenger). Once confirmed, stores a new version bound to the model's weights, audited; "
                       "the daemon triages the station's next films with it and their SR and Secondary Capture "
                       "name it.")
    p.add_argument("--station", required=True, metavar="NAME_OR_AE")
    p.add_argument("--target-sensitivity", type=float, metavar="S",
                   help="for the critical class(es) (default [onboarding] target_sensitivity)")
    p.add_argument("--min-per-class", type=int, metavar="N", default=None,
                   help="labelled films needed of a critical class and of the rest (default 2 x [onboarding] "
                   "min_per_class: a head needs more films than a threshold); on a model with an abnormality "
                   "output, abnormal and normal films (default [onboarding] adapt_min_per_class)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, store nothing")
    p.add_argument("--yes", action="store_true", help="store without asking (needed when not on a terminal)")
    p.add_argument("--rollback", action="store_true", help="retire the active site heads and restore the "
                   "previous version (or the model's own head)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.cli._db import open_database
    from cxr_node.cli.performance import station_name
    from cxr_node.onboarding import site_adaptation as sa

    station = station_name(settings, args.station)
    if not (args.rollback or args.dry_run or args.yes or sys.stdin.isatty()):
        raise ConfigError("adapt-site: not on a terminal: add --yes to store the site heads (or --dry-run)")
    o = settings.onboarding
    target = args.target_sensitivity if args.target_sensitivity is not None else o.target_sensitivity
    minimum = args.min_per_class if args.min_per_class is not None else 2 * o.min_per_class
    if not 0.5 <= target <= 1.0:
        raise ConfigError(f"--target-sensitivity must be from 0.5 to 1 (got {target})")
    if minimum < 5:
        raise ConfigError(f"--min-per-class must be at least 5 (got {minimum}): five-fold cross-validation")
    with open_database(settings) as db:
        if args.rollback:
            cur, prev = sa.rollback(db, station)
            out.write(f"station {station}: {sa.head_name(cur)} retired; films are now triaged with "
                      f"{sa.head_name(prev)}\n")
            return 0
        from cxr_node.model.infer import Predictor
        from cxr_node.model.lungs import LungSegmenter

        predictor = Predictor(settings.model.checkpoint, device="cpu",
                              ood_reference=settings.model.ood_reference or None)
        segmenter = LungSegmenter(settings.model.lung_checkpoint, device=predictor.device)
        meta = predictor.meta
        abnormal_axis = predictor.policy.has_abnormality
        if abnormal_axis and args.min_per_class is None:
            minimum = o.adapt_min_per_class
        with db.session() as s:
            films, feats, groups, skipped = sa.labelled_with_features(settings, s, station, predictor, segmenter)
            if abnormal_axis:
                result = sa.fit_abnormal(films, feats, groups, station=station,
                                         threshold=_abnormal_in_force(s, station, predictor),
                                         model_version=predictor.version, weights_sha256=predictor.weights_sha256,
                                         target_sensitivity=target, min_per_class=minimum, n_boot=args.bootstrap,
                                         skipped=skipped)
            else:
                result = sa.fit(films, feats, groups, station=station, labels=list(predictor.labels),
                                critical=list(meta.get("critical_labels") or ()),
                                thresholds={k: float(v) for k, v in meta["thresholds"].items()},
                                model_version=predictor.version, weights_sha256=predictor.weights_sha256,
                                target_sensitivity=target, min_per_class=minimum, n_boot=args.bootstrap,
                                skipped=skipped)
            result = sa.with_reference(s, result, films, feats, list(predictor.labels))
        if args.format == "json":
            json.dump(sa.report_of(result), out, indent=1)
            out.write("\n")
        else:
            write_result(result, out)
        if not result["accepted"]:
            out.write("no site head beat the model on the station's held-out labels: nothing stored (the model "
                      "stays the champion)\n")
            return 1
        if args.dry_run:
            out.write("nothing stored (--dry-run)\n")
            return 0
        if not args.yes:
            answer = input(f"store these heads as station {station}'s and use them from now on? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                out.write("nothing stored\n")
                return 1
        row = sa.store(db, result)
        out.write(f"station {station}: {sa.head_name(row)} stored and active for {', '.join(sorted(row.heads))} "
                  f"(model {row.model_version}, weights {row.weights_sha256[:12]}); `cxr-node adapt-site --station "
                  f"{station} --rollback` undoes it\n")
    return 0


def _abnormal_in_force(session, station: str, predictor) -> float:
    """The station's operating point on p(abnormal) now: its site calibration's (for these weights),
    else the model's."""
    from cxr_node.onboarding import abnormal
    from cxr_node.onboarding.site_calibration import active

    cal = active(session, station)
    t = abnormal.threshold_of(cal) if cal is not None and cal.weights_sha256 == predictor.weights_sha256 else None
    return float(predictor.policy.abnormal_threshold if t is None else t)


def _r(d: dict) -> str:
    return f"{d['sensitivity']:.3f} / {d['specificity']:.3f}"


def write_result(res: dict, out: TextIO) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in res["counts"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in res["skipped"].items() if v)
    axis = f"; abnormal {res['abnormal']} vs normal {res['normal']}" if res.get("axis") == "abnormal" else ""
    out.write(f"station {res['station']}: {res['films']} labelled film(s) of {res['patients']} patient(s) ({counts}"
              f"{axis})"
              f"{'; skipped ' + skipped if skipped else ''}; model {res['model_version']}\n")
    out.write(f"patient-grouped cross-validation; AUC with the paired bootstrap 95% interval of the difference; "
              f"sensitivity / specificity at the model's threshold (before) and at target {res['target_sensitivity']} "
              "(after, out of fold)\n")
    for c, v in res["classes"].items():
        a = v["paired_auc"]
        g = v["gate"]
        out.write(f"{c}: AUC model {a['auc_before']:.3f} -> head {a['auc_after']:.3f}, difference "
                  f"{a['difference']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}] ({a['n_pos']} vs {a['n_neg']}); "
                  f"sens/spec {_r(v['before_at_threshold'])} -> {_r(v['after_at_target'])}; gate "
                  f"{'passed: challenger wins' if g['passed'] else 'failed: the model stays'}\n")
    for line in res["not_fitted"]:
        out.write(f"not fitted (too few labelled films): {line}\n")
