"""Site onboarding on the abnormal axis (issue 26 item 5): how few labelled films may ``adapt-site``
ask for before its champion/challenger gate stops keeping a site safe, and does a site head on the
abnormal axis reach its goal?

    python -m training.onboarding.abnormal --features runs/v5/features.npz --manifest runs/v5/merged.csv \\
        --out runs/site-abnormal [--minimums 10,15,20,25,30,40,50] [--repeats 30]

Simulated sites the champion never saw: each source holding both classes whose films the bundled
backbone did not train on (nih: No Finding / Pneumonia, shenzhen: Normal / Tuberculosis; ieee8023
has 14 normals, too few). Copies of covid19-radiography films (the backbone's training folder) are
left out.

* **The champion** at a site is what the site would run out of the box: a v5-kind abnormality head
  (logistic, balanced source x class, ``--champion-l2``) on the pooled penultimate features
  (``f_final``, what site heads use) of every *other* source's films (same patient groups left
  out), its operating point at ``--target`` sensitivity on those films. ``--champion v2`` uses v2's
  1 - p(Normal) instead.
* **A draw** labels, by whole patients, ``n`` abnormal and ``n`` normal films (the minimum
  ``adapt-site`` would accept: a site labelling just enough), runs the gate exactly as
  ``adapt-site`` does (:func:`cxr_node.onboarding.abnormal.adapt`: patient-grouped 5-fold
  cross-validation, paired patient-bootstrap 95% interval of the AUC gain, kept if its lower bound
  is above 0), fits the head whether or not it passed, and measures on the site's *other* films:
  the AUC of the head and of the champion, and the share of abnormal films the head flags at its
  stored threshold.
* **Safe** (decided before the figures): a minimum keeps the site safe when at most 5% of draws
  accept a head whose AUC on the site's other films is below the champion's, and the accepted heads'
  sensitivity at their threshold on those films has a median within 0.05 of the target.

Features: ``python -m training.evaluate.abnormal extract`` (``f_final``, ``logits``, ``ids``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("training.onboarding.abnormal")

SITES = ("nih", "shenzhen")
NORMAL_LABELS = ("Normal", "No Finding")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.onboarding.abnormal", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="features.npz from python -m training.evaluate.abnormal extract")
    p.add_argument("--manifest", required=True, help="the merged manifest it was extracted from")
    p.add_argument("--out", required=True)
    p.add_argument("--sites", default=",".join(SITES))
    p.add_argument("--minimums", default="10,15,20,25,30,40,50", help="labelled films per class, comma-separated")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--target", type=float, default=0.95, help="the site head's target sensitivity")
    p.add_argument("--n-boot", type=int, default=500, help="the gate's bootstrap resamples (adapt-site: 1000)")
    p.add_argument("--champion", choices=["v5", "v2"], default="v5")
    p.add_argument("--champion-l2", type=float, default=100.0)
    p.add_argument("--feature-set", default="final", help="comma-separated f_* arrays the site head uses")
    p.add_argument("--seed", type=int, default=0)
    return p


def load(args: argparse.Namespace):
    from training.evaluate.frozen import seen_copies
    from training.evaluate.lso.folds import read_rows

    z = np.load(args.features)
    index = {str(i): k for k, i in enumerate(z["ids"])}
    X = np.concatenate([z[f"f_{k}"] for k in args.feature_set.split(",")], axis=1).astype(np.float64)
    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude") and r["id"] in index]
    seen = seen_copies(rows)
    return rows, index, X, z["logits"].astype(np.float64), [str(x) for x in z["labels"]], seen


def champion(args, rows, index, X, logits, flabels, site: str, site_rows: list[dict]) -> tuple[np.ndarray, float]:
    """The champion's p(abnormal) on the site's films, and its operating point (module docstring)."""
    from cxr_node.model.adaptation import balanced_weights, fit_logistic_head
    from cxr_node.model.calibration import softmax, threshold_for_sensitivity
    from training.evaluate.frozen import bundled_meta

    idx = [index[r["id"]] for r in site_rows]
    groups = {r["group"] for r in site_rows}
    train = [r for r in rows if r["source"] != site and r["group"] not in groups]
    yt = np.array([r["label"] not in NORMAL_LABELS for r in train])
    if args.champion == "v2":
        meta = bundled_meta(None)
        k = flabels.index("Normal")
        p_all = 1.0 - softmax(logits, meta["temperature"])[:, k]
        pt = p_all[[index[r["id"]] for r in train]]
        return p_all[idx], threshold_for_sensitivity(yt, pt, args.target)
    xt = X[[index[r["id"]] for r in train]]
    w = balanced_weights(["a" if v else "n" for v in yt], [r["source"] for r in train])
    head = fit_logistic_head(xt, yt.astype(int), ("Normal", "Abnormal"), l2=args.champion_l2, weights=w)

    def prob(x: np.ndarray) -> np.ndarray:
        s = head.logits(x)
        return 1.0 / (1.0 + np.exp(-(s[:, 1] - s[:, 0])))

    return prob(X[idx]), threshold_for_sensitivity(yt, prob(xt), args.target)


def one_draw(x, y, p0, t0, groups, n: int, rng, args, seed: int) -> dict | None:
    from cxr_node.model.adaptation import fit_site_head
    from cxr_node.model.calibration import roc_auc
    from cxr_node.onboarding import abnormal
    from training.onboarding.calibration import draw

    films = [{"label": "abnormal" if v else "normal", "patient": g} for v, g in zip(y, groups)]
    lab, ev = draw(films, n, rng)
    lab, ev = np.array(lab), np.array(ev)
    yl = y[lab]
    if yl.sum() < n or (~yl).sum() < n or len(set(y[ev])) < 2:
        return None
    gl = [groups[i] for i in lab]
    try:
        cv, _ = abnormal.adapt(x[lab], yl, p0[lab], t0, gl, target=args.target, min_per_class=n,
                               n_boot=args.n_boot, seed=seed)
        h = fit_site_head(x[lab], yl, gl, args.target, seed=seed)
    except (abnormal.Refused, ValueError) as e:
        return {"refused": str(e)}
    tc = abnormal.operating_point(yl, p0[lab], args.target)  # calibrate-site's operating point on these films
    s = x[ev] @ np.asarray(h["weight"]) + h["bias"]
    ph = 1.0 / (1.0 + np.exp(-s))
    ye = y[ev]
    flag = ph >= h["threshold"]
    return {"passed": cv["gate"]["passed"], "lower_bound": cv["gate"]["lower_bound"],
            "cv_gain": cv["paired_auc"]["difference"], "auc_champion": roc_auc(ye, p0[ev]), "auc_head": roc_auc(ye, ph),
            "head_sensitivity": float(flag[ye].mean()), "head_specificity": float((~flag[~ye]).mean()),
            "champion_sensitivity": float((p0[ev] >= t0)[ye].mean()),
            "champion_specificity": float((p0[ev] < t0)[~ye].mean()),
            "calibrated_sensitivity": float((p0[ev] >= tc)[ye].mean()),
            "calibrated_specificity": float((p0[ev] < tc)[~ye].mean()), "labelled": int(len(lab)),
            "evaluated": int(len(ev))}


def summarise(draws: list[dict], target: float) -> dict:
    ok = [d for d in draws if "passed" in d]
    acc = [d for d in ok if d["passed"]]

    def q(v: Sequence[float]) -> dict | None:
        if not v:
            return None
        a = np.asarray(v, float)
        return {"median": float(np.median(a)), "p05": float(np.quantile(a, 0.05)), "p95": float(np.quantile(a, 0.95))}

    worse = [d for d in ok if d["auc_head"] < d["auc_champion"]]
    harmful = [d for d in acc if d["auc_head"] < d["auc_champion"]]
    out = {"draws": len(ok), "refused": len(draws) - len(ok), "accepted": len(acc),
           "accepted_share": len(acc) / len(ok) if ok else None,
           "heads_worse_ungated": len(worse) / len(ok) if ok else None,
           "harmful_accepted": len(harmful), "harmful_accepted_share": len(harmful) / len(ok) if ok else None,
           "gain_all": q([d["auc_head"] - d["auc_champion"] for d in ok]),
           "gain_accepted": q([d["auc_head"] - d["auc_champion"] for d in acc]),
           "auc_champion": q([d["auc_champion"] for d in ok]), "auc_head_accepted": q([d["auc_head"] for d in acc]),
           "sensitivity_accepted": q([d["head_sensitivity"] for d in acc]),
           "specificity_accepted": q([d["head_specificity"] for d in acc]),
           "champion_sensitivity": q([d["champion_sensitivity"] for d in ok]),
           "champion_specificity": q([d["champion_specificity"] for d in ok]),
           "calibrated_sensitivity": q([d["calibrated_sensitivity"] for d in ok]),
           "calibrated_specificity": q([d["calibrated_specificity"] for d in ok])}
    sens = out["sensitivity_accepted"]
    out["safe"] = bool(ok and out["harmful_accepted_share"] <= 0.05
                       and (sens is None or sens["median"] >= target - 0.05))
    return out


def run(args: argparse.Namespace) -> dict:
    rows, index, X, logits, flabels, seen = load(args)
    minimums = [int(v) for v in args.minimums.split(",")]
    report: dict = {"features": str(args.features), "feature_set": args.feature_set, "champion": args.champion,
                    "champion_l2": args.champion_l2, "target": args.target, "repeats": args.repeats,
                    "n_boot": args.n_boot, "sites": {}}
    for site in args.sites.split(","):
        srows = [r for r in rows if r["source"] == site and r["id"] not in seen]
        y = np.array([r["label"] not in NORMAL_LABELS for r in srows])
        x = X[[index[r["id"]] for r in srows]]
        groups = [r["group"] for r in srows]
        p0, t0 = champion(args, rows, index, X, logits, flabels, site, srows)
        from cxr_node.model.calibration import roc_auc

        site_rep = {"films": len(srows), "abnormal": int(y.sum()), "normal": int((~y).sum()),
                    "patients": len(set(groups)), "champion_auc_whole_site": roc_auc(y, p0),
                    "champion_threshold": float(t0), "minimums": {}}
        log.info("%s: %d films (%d abnormal), champion AUC %.3f", site, len(srows), y.sum(), roc_auc(y, p0))
        for n in minimums:
            rng = np.random.default_rng(args.seed + n)
            draws = [d for d in (one_draw(x, y, p0, t0, groups, n, rng, args, seed=k) for k in range(args.repeats))
                     if d is not None]
            s = summarise(draws, args.target)
            site_rep["minimums"][str(n)] = s
            log.info("%s n=%d: %d draws, accepted %s, harmful accepted %s, gain(accepted) %s, sens %s", site, n,
                     s["draws"], s["accepted"], s["harmful_accepted"], s["gain_accepted"], s["sensitivity_accepted"])
        report["sites"][site] = site_rep
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report) + "\n")
    return report


def _q(v: dict | None, fmt: str = "{:.3f}") -> str:
    if not v:
        return "-"
    return f"{fmt.format(v['median'])} [{fmt.format(v['p05'])}, {fmt.format(v['p95'])}]"


def markdown(rep: dict) -> str:
    lines = [f"Champion: {rep['champion']} (p(abnormal) out of the box); site head on f_{rep['feature_set']}; "
             f"target sensitivity {rep['target']}; {rep['repeats']} draws per minimum; gate bootstrap "
             f"{rep['n_boot']}. Medians [5%, 95%] over draws, measured on the site's other films.", "",
             "| site | labelled per class | draws | gate accepts | accepted and worse than the champion | "
             "heads worse, ungated | AUC champion | AUC gain, accepted | head sensitivity, accepted | "
             "head specificity, accepted | safe |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for site, r in rep["sites"].items():
        for n, s in r["minimums"].items():
            share = "-" if s["accepted_share"] is None else f"{100 * s['accepted_share']:.0f}%"
            lines.append(f"| {site} ({r['abnormal']} / {r['normal']}) | {n} | {s['draws']} | {s['accepted']} ({share}) | "
                         f"{s['harmful_accepted']} | {100 * (s['heads_worse_ungated'] or 0):.0f}% | "
                         f"{_q(s['auc_champion'])} | {_q(s['gain_accepted'], '{:+.3f}')} | "
                         f"{_q(s['sensitivity_accepted'])} | {_q(s['specificity_accepted'])} | "
                         f"{'yes' if s['safe'] else 'no'} |")
    lines += ["", "calibrate-site on the same labelled films (the champion's p(abnormal), the station's operating "
              "point), on the site's other films:", "",
              "| site | labelled per class | sensitivity, champion's point | specificity, champion's point | "
              "sensitivity, site's point | specificity, site's point |", "|---|---|---|---|---|---|"]
    for site, r in rep["sites"].items():
        for n, s in r["minimums"].items():
            lines.append(f"| {site} | {n} | {_q(s['champion_sensitivity'])} | {_q(s['champion_specificity'])} | "
                         f"{_q(s['calibrated_sensitivity'])} | {_q(s['calibrated_specificity'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    rep = run(args)
    sys.stdout.write(markdown(rep) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
