"""Goal figure for site onboarding: does a site calibration put the urgent flag's sensitivity where
the site asked, on films the bundled model never saw?

    OMP_NUM_THREADS=2 nice -n 10 python -m training.onboarding.calibration --data /path/to/data \\
        --covid hannover-covid --normal nih-chestxray8-subset --out training/results/site-onboarding

The simulated site: the COVID films of one folder (default hannover-covid, Hannover Medical School)
and the No Finding (-> Normal) and Pneumonia (-> Other: a pneumonia that is not one of the
model's classes) films of another (default nih-chestxray8-subset). Films that are copies of a
covid19-radiography film (the bundled model's training folder; the ``also_in_covid19_radiography``
column) are left out. The bundled model predicts every film once (cached in ``predictions.csv``);
films its out-of-domain check refuses are left out, as the daemon would not triage them.

Each repetition draws, by patient, at most ``--per-class`` films of each label as the labelled
calibration films, fits temperature and operating points on them with the code `cxr-node
calibrate-site` uses (:func:`cxr_node.model.calibration.fit_operating_points`), and measures the urgent
flag on the site's OTHER films, with the model's global operating points and with the site's.
Repetition 0 is reported with Wilson 95% intervals; all repetitions give the spread.

**Site adaptation goal** (issue 20, ``cxr-node adapt-site``), with ``--adaptation FEATURES.npz``:

    python -m training.onboarding.calibration --adaptation runs/v4/frozen/features.npz \
        --manifest runs/v4/merged.csv --out training/results/v4/site-adaptation \
        [--baseline-predictions training/results/v4/frozen/lso-v4-recipe/ieee8023-predictions.csv]

Simulated sites the model never trained on: ieee8023 (COVID against its other pneumonias), and each
ieee8023 country with both classes. Copies of covid19-radiography films (the backbone's training
folder) are left out. Each of ``--repeats`` draws takes whole patients as the site's labelled
films, at most ``--max-labelled`` (200) and at most half the site's films, fits the site head
(:func:`cxr_node.model.adaptation.fit_site_head`, the code ``adapt-site`` runs) on the frozen features
``training.evaluate.frozen extract`` wrote, and measures COVID AUC on the site's OTHER films, the model as is
against the head. Draw 0 has the paired patient-bootstrap 95% interval of the gain; all draws give
the median and the 5-95% spread. Goal: gain >= 0.10.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger("training.onboarding.calibration")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.onboarding.calibration", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adaptation", default=None, metavar="FEATURES_NPZ",
                   help="report the site-adaptation goal instead (frozen features from python -m training.evaluate.frozen "
                   "extract); needs --manifest")
    p.add_argument("--manifest", default=None, help="merged manifest (with --adaptation)")
    p.add_argument("--baseline-predictions", default=None,
                   help="with --adaptation: the 'model as is' p(COVID) from these predictions (e.g. the ieee8023 "
                   "hold-out's fold) instead of the bundled model's")
    p.add_argument("--max-labelled", type=int, default=200)
    p.add_argument("--keep-seen-copies", action="store_true",
                   help="with --adaptation: keep ieee8023 films that are copies of covid19-radiography films (the "
                   "model trained on those; the FIELD-NOTES figure kept them)")
    p.add_argument("--adapt-target", type=float, default=0.90, help="site head's target sensitivity")
    p.add_argument("--min-per-class", type=int, default=10, help="a country needs this many films of each class")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--data", default=None, help="folder holding the source folders (hannover-covid, "
                   "nih-chestxray8-subset, ...)")
    p.add_argument("--covid", default="hannover-covid", help="source folder of the site's COVID films")
    p.add_argument("--normal", default="nih-chestxray8-subset", help="source folder of its No Finding and "
                   "Pneumonia films")
    p.add_argument("--checkpoint", default=None, help="model (default: the bundled one)")
    p.add_argument("--target", type=float, action="append", default=None,
                   help="target sensitivity of the urgent flag (repeatable; default 0.90 and 0.95)")
    p.add_argument("--per-class", type=int, default=100, help="labelled calibration films per label (default 100)")
    p.add_argument("--repeats", type=int, default=200, help="random calibration draws (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for predictions.csv, report.json, report.md")
    p.add_argument("--threads", type=int, default=2)
    return p


def read_site(data: Path, covid: str, normal: str) -> list[dict]:
    films = []
    for folder, mapping in ((covid, {"COVID": "COVID"}), (normal, {"No Finding": "Normal", "Pneumonia": "Other"})):
        with open(data / folder / "manifest.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["label"] not in mapping or (r.get("also_in_covid19_radiography") or "").strip():
                    continue
                films.append({"id": f"{folder}:{r['path']}", "path": str(data / folder / r["path"]),
                              "label": mapping[r["label"]], "patient": f"{folder}:{r.get('patient_id') or r['path']}"})
    return films


def predict(films: list[dict], checkpoint: Path, cache: Path) -> list[dict]:
    """p(label) and the out-of-domain verdict per film, from the cache when it has them all."""
    if cache.is_file():
        with open(cache, newline="", encoding="utf-8") as f:
            rows = {r["id"]: r for r in csv.DictReader(f)}
        if all(fm["id"] in rows for fm in films):
            for fm in films:
                r = rows[fm["id"]]
                fm.update(probabilities={k[2:]: float(v) for k, v in r.items() if k.startswith("p_")},
                          refused=r["refused"] == "1", ood_score=float(r["ood_score"]) if r["ood_score"] else None)
            log.info("predictions read from %s", cache)
            return films
    from cxr_node.errors import PreprocessError
    from cxr_node.model.infer import Predictor

    pred = Predictor(checkpoint, device="cpu")
    threshold = pred.ood.threshold if pred.ood else None
    batch: list[tuple[dict, object]] = []

    def flush() -> None:
        for (fm, _), p in zip(batch, pred.predict([x for _, x in batch], explain=False)):
            fm.update(probabilities=dict(zip(p.labels, p.probabilities)), ood_score=p.ood_score,
                      refused=threshold is not None and p.ood_score is not None and p.ood_score > threshold)
        batch.clear()

    for i, fm in enumerate(films):
        try:
            batch.append((fm, pred.preprocess(fm["path"])))
        except PreprocessError as e:
            fm.update(probabilities={}, ood_score=None, refused=True, why=str(e))
        if len(batch) == 32:
            flush()
        if i % 200 == 0:
            log.info("%d/%d films", i, len(films))
    if batch:
        flush()
    labels = list(pred.labels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "patient", "refused", "ood_score"] + [f"p_{n}" for n in labels])
        for fm in films:
            w.writerow([fm["id"], fm["label"], fm["patient"], int(fm["refused"]),
                        "" if fm["ood_score"] is None else f"{fm['ood_score']:.4f}"]
                       + [f"{fm['probabilities'].get(n, 0.0):.6f}" for n in labels])
    return films


def draw(films: list[dict], per_class: int, rng) -> tuple[list[int], list[int]]:
    """Calibration and evaluation film indices: whole patients, at most ``per_class`` films per label."""
    by_label: dict[str, dict[str, list[int]]] = {}
    for i, f in enumerate(films):
        by_label.setdefault(f["label"], {}).setdefault(f["patient"], []).append(i)
    cal: list[int] = []
    for _label, patients in sorted(by_label.items()):
        order = list(patients)
        rng.shuffle(order)
        taken = 0
        for pid in order:
            if taken + len(patients[pid]) > per_class:
                continue
            cal.extend(patients[pid])
            taken += len(patients[pid])
            if taken >= per_class:
                break
    chosen = set(cal)
    return cal, [i for i in range(len(films)) if i not in chosen]


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.calibration import fit_operating_points, softmax
    from cxr_node.onboarding.site_calibration import ModelInfo, operating_figures

    data = Path(args.data)
    ckpt = Path(args.checkpoint) if args.checkpoint else BUNDLED_CHECKPOINT
    model = ModelInfo.from_checkpoint(ckpt)
    labels = list(model.labels)
    out = Path(args.out)
    films = predict(read_site(data, args.covid, args.normal), ckpt, out / "predictions.csv")
    kept = [f for f in films if not f["refused"]]
    counts = {lab: {"films": sum(f["label"] == lab for f in films),
                    "refused": sum(f["label"] == lab and f["refused"] for f in films)}
              for lab in ("COVID", "Normal", "Other")}
    y = np.array([labels.index(f["label"]) if f["label"] in labels else -1 for f in kept])
    p_model = np.array([[f["probabilities"][n] for n in labels] for f in kept])
    logits = np.log(np.clip(p_model, 1e-12, None)) * model.temperature
    targets = args.target or [0.90, 0.95]
    report = {"site": {"covid": args.covid, "normal_and_other": args.normal, "films": counts,
                       "triaged": len(kept)},
              "model": {"version": model.version, "temperature": model.temperature, "thresholds": model.thresholds},
              "per_class": args.per_class, "repeats": args.repeats, "seed": args.seed, "targets": {}}
    for target in targets:
        rng = np.random.default_rng(args.seed)
        reps = []
        for _ in range(args.repeats):
            cal, ev = draw(kept, args.per_class, rng)
            fit = fit_operating_points(logits[cal], y[cal], labels, model.critical, target, "point")
            th = dict(model.thresholds)
            th.update({c: fit["thresholds"][c] for c in model.critical if c in fit["thresholds"]})
            # the urgent flag is what this figure is about; the other classes' points do not change it
            g = operating_figures(y[ev], softmax(logits[ev], model.temperature), model.thresholds, labels,
                                  model.critical)["urgent_flag"]
            s = operating_figures(y[ev], softmax(logits[ev], fit["temperature"]), th, labels,
                                  model.critical)["urgent_flag"]
            reps.append({"calibration_films": len(cal), "evaluation_films": len(ev),
                         "cal_counts": {lab: int(sum(kept[i]["label"] == lab for i in cal))
                                        for lab in ("COVID", "Normal", "Other")},
                         "temperature": fit["temperature"], "threshold": th[model.critical[0]],
                         "global": g, "site": s})
        first = reps[0]

        def spread(key: str, which: str, reps: list = reps) -> dict:
            v = np.array([rp[which][key]["value"] for rp in reps], dtype=float)
            return {"median": float(np.median(v)), "p05": float(np.quantile(v, 0.05)),
                    "p95": float(np.quantile(v, 0.95)), "mean": float(v.mean())}

        sens_site = np.array([rp["site"]["sensitivity"]["value"] for rp in reps])
        sens_glob = np.array([rp["global"]["sensitivity"]["value"] for rp in reps])
        report["targets"][str(target)] = {
            "repetition_0": first,
            "global": {"sensitivity": spread("sensitivity", "global"), "specificity": spread("specificity", "global")},
            "site": {"sensitivity": spread("sensitivity", "site"), "specificity": spread("specificity", "site")},
            "within_0.05": {"site": float(np.mean(np.abs(sens_site - target) <= 0.05)),
                            "global": float(np.mean(np.abs(sens_glob - target) <= 0.05))},
            "site_threshold": spread_values([rp["threshold"] for rp in reps]),
        }
        log.info("target %.2f: sensitivity global %.3f, site %.3f (median over %d draws); within 0.05: site %.0f%%, "
                 "global %.0f%%", target, float(np.median(sens_glob)), float(np.median(sens_site)), args.repeats,
                 100 * report["targets"][str(target)]["within_0.05"]["site"],
                 100 * report["targets"][str(target)]["within_0.05"]["global"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report) + "\n")
    return report


def spread_values(v: Sequence[float]) -> dict:
    import numpy as np

    a = np.asarray(v, dtype=float)
    return {"median": float(np.median(a)), "p05": float(np.quantile(a, 0.05)), "p95": float(np.quantile(a, 0.95))}


def _r(x: dict) -> str:
    return f"{x['value']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] ({x['k']}/{x['n']})"


def markdown(rep: dict) -> str:
    c = rep["site"]["films"]
    lines = [f"Site: {rep['site']['covid']} COVID ({c['COVID']['films']} films) + {rep['site']['normal_and_other']} "
             f"Normal ({c['Normal']['films']}) and Other pneumonia ({c['Other']['films']}); refused as out of domain: "
             f"{sum(v['refused'] for v in c.values())}; triaged {rep['site']['triaged']}. Calibration on at most "
             f"{rep['per_class']} labelled films per label (by patient), measured on the site's other films; "
             f"{rep['repeats']} random draws.", "",
             "| target | operating points | urgent sensitivity (draw 0, Wilson 95%) | urgent specificity (draw 0) | "
             "sensitivity median [5%, 95%] over draws | draws within 0.05 of target |",
             "|---|---|---|---|---|---|"]
    for t, r in rep["targets"].items():
        first = r["repetition_0"]
        for which, name in (("global", "global (model)"), ("site", "site calibration")):
            s = r[which]["sensitivity"]
            lines.append(f"| {float(t):.2f} | {name} | {_r(first[which]['sensitivity'])} | "
                         f"{_r(first[which]['specificity'])} | {s['median']:.3f} [{s['p05']:.3f}, {s['p95']:.3f}] | "
                         f"{100 * r['within_0.05'][which]:.0f}% |")
    return "\n".join(lines)


def adaptation(args: argparse.Namespace) -> dict:
    """The site-adaptation goal figure (module docstring)."""
    import numpy as np

    from cxr_node.model.adaptation import fit_site_head, paired_auc_difference
    from cxr_node.model.calibration import roc_auc, softmax
    from training.evaluate.frozen import bundled_meta, load_features, seen_copies
    from training.evaluate.lso.folds import read_rows

    rows = read_rows(Path(args.manifest))
    index, X, L, flabels = load_features(Path(args.adaptation))
    seen = seen_copies(rows)
    meta = bundled_meta(Path(args.checkpoint) if args.checkpoint else None)
    base = {}
    if args.baseline_predictions:
        with open(args.baseline_predictions, newline="", encoding="utf-8") as f:
            base = {r["id"]: float(r["p_COVID"]) for r in csv.DictReader(f)}
    ieee = [r for r in rows if not r.get("exclude") and r["source"] == "ieee8023" and r["site"].startswith("ieee8023/")
            and r["label"] in ("COVID", "Other pneumonia") and (args.keep_seen_copies or r["id"] not in seen)
            and r["id"] in index
            and (not base or r["id"] in base)]
    sites = {"ieee8023 (all countries)": ieee}
    by_country: dict[str, list] = {}
    for r in ieee:
        by_country.setdefault(r["site"], []).append(r)
    for site, rs in sorted(by_country.items()):
        n_pos = sum(r["label"] == "COVID" for r in rs)
        if n_pos >= args.min_per_class and len(rs) - n_pos >= args.min_per_class and not site.endswith("/unknown"):
            sites[site] = rs
    report: dict = {"max_labelled": args.max_labelled, "seen_copies_kept": bool(args.keep_seen_copies),
                    "repeats": args.repeats, "target": args.adapt_target,
                    "model": meta["version"], "baseline": "bundled model" if not base else
                    f"p(COVID) from {args.baseline_predictions}", "sites": {}}
    ci = flabels.index("COVID")
    for site, rs in sites.items():
        x = X[[index[r["id"]] for r in rs]]
        y = np.array([r["label"] == "COVID" for r in rs])
        p_model = (np.array([base[r["id"]] for r in rs]) if base
                   else softmax(L[[index[r["id"]] for r in rs]], meta["temperature"])[:, ci])
        groups = [r["group"] for r in rs]
        patients = sorted(set(groups))
        budget = min(args.max_labelled, len(rs) // 2)
        rng = np.random.default_rng(args.seed)
        draws = []
        for k in range(args.repeats):
            order = list(patients)
            rng.shuffle(order)
            chosen: set[str] = set()
            n = 0
            for g in order:
                m = groups.count(g)
                if n + m > budget:
                    continue
                chosen.add(g)
                n += m
            lab = np.array([g in chosen for g in groups])
            ev = ~lab
            if len(set(y[lab])) < 2 or len(set(y[ev])) < 2 or min(y[lab].sum(), (~y[lab]).sum()) < 3:
                continue
            try:
                head = fit_site_head(x[lab], y[lab], [g for g, t in zip(groups, lab) if t], args.adapt_target, seed=k)
            except ValueError:
                continue
            s = x[ev] @ head["weight"] + head["bias"]
            d = {"labelled": int(lab.sum()), "labelled_covid": int(y[lab].sum()), "evaluated": int(ev.sum()),
                 "auc_model": roc_auc(y[ev], p_model[ev]), "auc_head": roc_auc(y[ev], s)}
            if not draws:
                d["paired"] = paired_auc_difference(y[ev], p_model[ev], s, [g for g, t in zip(groups, ev) if t],
                                                    n_boot=args.n_boot, seed=0)
            draws.append(d)
        if not draws:
            report["sites"][site] = {"films": len(rs), "note": "too few films of one class for any draw"}
            continue
        gain = np.array([d["auc_head"] - d["auc_model"] for d in draws])

        def spread(v: np.ndarray) -> dict:
            return {"median": float(np.median(v)), "p05": float(np.quantile(v, 0.05)), "p95": float(np.quantile(v, 0.95))}

        report["sites"][site] = {
            "films": len(rs), "covid": int(y.sum()), "other_pneumonia": int((~y).sum()), "draws": len(draws),
            "labelled_per_draw": spread(np.array([d["labelled"] for d in draws], float)),
            "auc_model": spread(np.array([d["auc_model"] for d in draws])),
            "auc_head": spread(np.array([d["auc_head"] for d in draws])), "gain": spread(gain),
            "draw0_paired": draws[0]["paired"], "goal_gain_0.10_met_by_median": bool(np.median(gain) >= 0.10)}
        log.info("%s: AUC model %.3f -> head %.3f (median of %d draws), gain %.3f", site,
                 float(np.median([d["auc_model"] for d in draws])), float(np.median([d["auc_head"] for d in draws])),
                 len(draws), float(np.median(gain)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Site head (logistic on frozen penultimate features of {report['model']}, calibration folded in) "
             f"fitted on at most {args.max_labelled} labelled films (whole patients, at most half the site), "
             f"COVID vs other pneumonias measured on the site's other films; baseline: {report['baseline']}; "
             f"{args.repeats} draws.", "",
             "| site | films (COVID / other) | labelled per draw | AUC model | AUC site head | gain, median [5%, 95%] | "
             "draw 0: paired gain [95% CI] |", "|---|---|---|---|---|---|---|"]
    for site, r in report["sites"].items():
        if "gain" not in r:
            lines.append(f"| {site} | {r['films']} | - | - | - | - | {r['note']} |")
            continue
        p0 = r["draw0_paired"]
        lines.append(f"| {site} | {r['films']} ({r['covid']} / {r['other_pneumonia']}) | "
                     f"{r['labelled_per_draw']['median']:.0f} | {r['auc_model']['median']:.3f} | "
                     f"{r['auc_head']['median']:.3f} | {r['gain']['median']:+.3f} [{r['gain']['p05']:+.3f}, "
                     f"{r['gain']['p95']:+.3f}] | {p0['difference']:+.3f} [{p0['ci95'][0]:+.3f}, {p0['ci95'][1]:+.3f}] |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    if args.adaptation:
        if not args.manifest:
            raise SystemExit("--adaptation needs --manifest (the merged manifest the features were extracted from)")
        adaptation(args)
        return 0
    if not args.data:
        raise SystemExit("--data is needed (the folder holding the source folders)")
    import torch

    torch.set_num_threads(args.threads)
    rep = run(args)
    sys.stdout.write(markdown(rep) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
