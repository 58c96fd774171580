"""Leave-source-out figures: per hold-out and pooled blocks with intervals, the goals, the markdown tables,
and operating points cross-fitted over hold-outs."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.evaluate.lso.folds import (
    GOALS,
    NORMAL,
    has_threshold,
    model_knows,
    prediction_columns,
    prediction_criticals,
    read_predictions,
    read_predictions_in,
)

log = logging.getLogger("training.evaluate.lso")

# --------------------------------------------------------------------------- metrics


def _block(preds: Sequence[dict[str, str]], labels: Sequence[str], critical: str, n_boot: int, seed: int) -> dict:
    from training.evaluate.metrics import bootstrap_binary_auc, proportion

    y_c = np.array([r["label"] == critical for r in preds])
    p_c = np.array([float(r[f"p_{critical}"]) for r in preds])
    urgent = np.array([r["urgent"] == "1" for r in preds])
    top_c = np.array([r["top"] == critical for r in preds])
    groups = np.array([r["group"] for r in preds])
    out: dict[str, Any] = {"n": len(preds), "labels": dict(sorted(Counter(r["label"] for r in preds).items()))}
    if y_c.any():
        out["covid_flagged_urgent"] = proportion(urgent[y_c])
        out["covid_top_class"] = proportion(top_c[y_c])
    per_label = {}
    for lab in sorted({r["label"] for r in preds} - {critical}):
        m = np.array([r["label"] == lab for r in preds])
        per_label[lab] = {"not_called_covid": proportion(~top_c[m]), "not_flagged_urgent": proportion(~urgent[m]),
                          "called": dict(Counter(r["top"] for r, k in zip(preds, m) if k).most_common())}
    if per_label:
        out["non_covid"] = per_label
    normal = np.array([r["label"] == NORMAL for r in preds])
    if normal.any():
        out["urgent_on_normals"] = proportion(urgent[normal])
    if y_c.any() and (~y_c).any():
        out["covid_auc"] = bootstrap_binary_auc(y_c, p_c, n_boot=n_boot, seed=seed, groups=groups)
    # the other critical classes (e.g. Tuberculosis): flagged share of their films, and their AUC
    # against every other film where the model has the class
    for c in prediction_criticals(preds):
        if c == critical:
            continue
        y = np.array([r["label"] == c for r in preds])
        has = np.array([has_threshold(r, c) for r in preds])
        d: dict[str, Any] = {}
        if y.any():
            d["flagged_urgent"] = proportion(urgent[y])
            d["films_whose_model_lacks_the_class"] = int((y & ~has).sum())
        if (y & has).any() and (~y & has).any():
            pc = np.array([float(r[f"p_{c}"]) for r in preds])
            d["auc"] = bootstrap_binary_auc(y[has], pc[has], n_boot=n_boot, seed=seed, groups=groups[has])
        if (~y & has).any():
            d["others_flagged_by_it"] = proportion(np.array([float(r[f"p_{c}"]) >= float(r[f"threshold_{c}"])
                                                             for r, k in zip(preds, ~y & has) if k]))
        if d:
            out.setdefault("other_critical", {})[c] = d
    return out


def report(preds: Sequence[dict[str, str]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The LSO report over prediction rows (from one or several hold-outs)."""
    from training.evaluate.metrics import binary_ece, expected_calibration_error

    if not preds:
        raise ValueError("no predictions")
    labels, critical = prediction_columns(preds)
    out: dict[str, Any] = {"model_labels": labels, "critical": critical, "per_holdout": {}}
    by_h: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in preds:
        by_h[r["holdout"]].append(r)
    for h, rs in by_h.items():
        out["per_holdout"][h] = _block(rs, labels, critical, n_boot, seed)
        # per site inside a hold-out (e.g. ieee8023's countries), where counts allow
        by_site: dict[str, list[dict[str, str]]] = defaultdict(list)
        for r in rs:
            by_site[r["site"]].append(r)
        sites = {s: _block(v, labels, critical, n_boot, seed) for s, v in sorted(by_site.items())
                 if len(by_site) > 1 and sum(x["label"] == critical for x in v) >= 10
                 and sum(x["label"] != critical for x in v) >= 4}
        if sites:
            out["per_holdout"][h]["per_site"] = sites
    pooled = _block(preds, labels, critical, n_boot, seed)
    y_c = np.array([r["label"] == critical for r in preds])
    p_c = np.array([float(r[f"p_{critical}"]) for r in preds])
    pooled["ece_covid_binary"] = binary_ece(y_c, p_c)
    for c in prediction_criticals(preds):
        has = [r for r in preds if has_threshold(r, c)]
        if c != critical and has and any(r["label"] == c for r in has):
            pooled.setdefault("ece_binary", {})[c] = binary_ece(np.array([r["label"] == c for r in has]),
                                                                np.array([float(r[f"p_{c}"]) for r in has]))
    known = [r for r in preds if model_knows(r, labels)]
    if known:
        P = np.array([[float(r[f"p_{n}"]) for n in labels] for r in known])
        y = np.array([labels.index(r["label"]) for r in known])
        pooled["ece_top_label"] = expected_calibration_error(y, P)[0]
        pooled["ece_top_label_n"] = len(known)
    out["pooled"] = pooled
    out["goals"] = check_goals(pooled, out["per_holdout"])
    return out


def check_goals(pooled: dict[str, Any], per_holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """The issue's goals. The pooled AUC mixes sources (a COVID-only hold-out against a normal-only
    one rewards telling sources apart), so the within-source AUC of every hold-out that has both
    classes is checked too; that is the stricter figure."""
    g: dict[str, Any] = {}
    auc = pooled.get("covid_auc", {}).get("auc")
    g["pooled_covid_auc >= 0.80"] = None if auc is None else bool(auc >= GOALS["pooled_covid_auc_min"])
    within = [b["covid_auc"]["auc"] for b in (per_holdout or {}).values()
              if "covid_auc" in b and not math.isnan(b["covid_auc"]["auc"])]
    g["within_source_covid_auc >= 0.80 (every hold-out with both classes)"] = (
        None if not within else bool(min(within) >= GOALS["pooled_covid_auc_min"]))
    un, cf = pooled.get("urgent_on_normals"), pooled.get("covid_flagged_urgent")
    g["urgent_on_normals <= 0.20 with covid_flagged >= 0.70"] = (
        None if not un or not cf else bool(un["rate"] <= GOALS["urgent_on_normals_max"]
                                          and cf["rate"] >= GOALS["covid_flagged_min"]))
    g["ece_covid_binary <= 0.05"] = bool(pooled["ece_covid_binary"] <= GOALS["ece_max"])
    return g


def _pct(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['rate']:.3f} ({d['k']}/{d['n']}) [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def _auc(d: dict | None) -> str:
    if not d or d["auc"] is None or (isinstance(d["auc"], float) and math.isnan(d["auc"])):
        return "-"
    return f"{d['auc']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] ({d['n_pos']} vs {d['n_neg']})"


def markdown(rep: dict[str, Any]) -> str:
    lines = ["| hold-out | n | COVID flagged urgent | urgent on Normal | within-source COVID AUC |",
             "|---|---|---|---|---|"]
    for h, b in list(rep["per_holdout"].items()) + [("**pooled**", rep["pooled"])]:
        lines.append(f"| {h} | {b['n']} | {_pct(b.get('covid_flagged_urgent'))} | {_pct(b.get('urgent_on_normals'))} "
                     f"| {_auc(b.get('covid_auc'))} |")
    site_lines = [f"| {h} / {s} | {b['n']} | {_pct(b.get('covid_flagged_urgent'))} | "
                  f"{_pct((b.get('non_covid') or {}).get('Other pneumonia', {}).get('not_flagged_urgent'))} | "
                  f"{_auc(b.get('covid_auc'))} |"
                  for h, hb in rep["per_holdout"].items() for s, b in (hb.get("per_site") or {}).items()]
    if site_lines:
        lines += ["", "| hold-out / site | n | COVID flagged urgent | Other pneumonia not flagged | "
                  "within-site COVID AUC |", "|---|---|---|---|---|", *site_lines]
    lines += ["", "| hold-out | label | not called COVID (argmax) | not flagged urgent |", "|---|---|---|---|"]
    for h, b in rep["per_holdout"].items():
        for lab, d in (b.get("non_covid") or {}).items():
            lines.append(f"| {h} | {lab} | {_pct(d['not_called_covid'])} | {_pct(d['not_flagged_urgent'])} |")
    other = [(h, c, d) for h, b in list(rep["per_holdout"].items()) + [("**pooled**", rep["pooled"])]
             for c, d in (b.get("other_critical") or {}).items()]
    if other:
        lines += ["", "| hold-out | critical class | its films flagged urgent | of them, the model lacks the class | "
                  "AUC (vs every other film) | other films flagged by it |", "|---|---|---|---|---|---|"]
        lines += [f"| {h} | {c} | {_pct(d.get('flagged_urgent'))} | {d.get('films_whose_model_lacks_the_class', '-')} "
                  f"| {_auc(d.get('auc'))} | {_pct(d.get('others_flagged_by_it'))} |" for h, c, d in other]
    called = [(h, lab, d["called"]) for h, b in rep["per_holdout"].items()
              for lab, d in (b.get("non_covid") or {}).items() if d.get("called")]
    if called:
        lines += ["", "| hold-out | label | called (top class) |", "|---|---|---|"]
        lines += [f"| {h} | {lab} | {', '.join(f'{k} {v}' for k, v in c.items())} |" for h, lab, c in called]
    p = rep["pooled"]
    for c, e in (p.get("ece_binary") or {}).items():
        lines += ["", f"Binary ECE of p({c}) over the films whose model has it: {e:.3f}"]
    lines += ["", "The pooled AUC mixes sources: a hold-out with only COVID films (hannover) against one with "
              "only non-COVID films (nih) rewards telling the sources apart. The within-source AUC (a "
              "hold-out with both classes) is the cleaner figure."]
    lines += ["", f"Pooled calibration: binary ECE of p({rep['critical']}) {p['ece_covid_binary']:.3f}"
              + (f"; top-label ECE {p['ece_top_label']:.3f} on {p['ece_top_label_n']} films with a model label"
                 if "ece_top_label" in p else ""), "", "Goals: " + "; ".join(
                     f"{k}: {'met' if v else ('not met' if v is False else 'n/a')}" for k, v in rep["goals"].items())]
    return "\n".join(lines) + "\n"


def write_report(out: Path, preds: Sequence[dict[str, str]], extra: dict[str, Any], n_boot: int) -> dict:
    rep = report(preds, n_boot=n_boot)
    rep.update(extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(rep), encoding="utf-8")
    log.info("wrote %s\n%s", out / "report.json", markdown(rep))
    return rep


# --------------------------------------------------------------------------- cross-fitted operating points


def crossfit(preds: Sequence[dict[str, str]], target: float, rule: str = "wilson", margin: float = 0.0,
             temperature: bool = True, extra_fit: dict[str, Sequence[dict[str, str]]] | None = None
             ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Operating points chosen on leave-source-out predictions, judged on a source they never saw.

    For each hold-out H, a temperature (multi-class NLL over the films with a model label) and each
    critical class's threshold (``rule`` at ``target`` sensitivity, as ``training.train.calibrate``) are
    fitted on the pooled predictions of the *other* hold-outs only, then applied to H's predictions.
    The returned rows are H's films re-scored that way (``urgent``: any critical class at or above
    its threshold, ``threshold_*``, ``p_*``), so :func:`report` reads them as it reads a fold's own.
    ``info["all"]`` is the same fit on every hold-out: the operating point a model trained on all
    sources would ship with.

    A critical class other than the first whose films lie in no other hold-out (Tuberculosis: every
    film is Shenzhen's) takes its threshold from ``extra_fit[class]`` (prediction rows of that class's
    own grouped cross-validation, re-scaled with the same temperature) when given, else from each
    fold's own validation threshold (recorded as such)."""
    from cxr_node.model.calibration import fit_temperature, logits_from, softmax, threshold_for_sensitivity_rule

    if not preds:
        raise ValueError("no predictions")
    labels, critical = prediction_columns(preds)
    crits = prediction_criticals(preds)
    extra_fit = extra_fit or {}
    P = np.array([[float(r[f"p_{n}"]) for n in labels] for r in preds])
    logit = logits_from(P, 1.0)
    holdout = np.array([r["holdout"] for r in preds])
    known = np.array([model_knows(r, labels) for r in preds])
    y = np.array([labels.index(r["label"]) if r["label"] in labels else -1 for r in preds])
    is_c = {c: np.array([r["label"] == c for r in preds]) for c in crits}
    has_c = {c: np.array([has_threshold(r, c) for r in preds]) for c in crits}
    extra = {c: (np.array([r["label"] == c for r in rows]),
                 logits_from(np.array([[float(r.get(f"p_{n}") or 0.0) for n in labels] for r in rows]), 1.0))
             for c, rows in extra_fit.items()}

    def fit(m: np.ndarray) -> dict[str, Any]:
        k = m & known
        t = fit_temperature(logit[k], y[k]) if temperature and k.sum() >= 2 and len(set(y[k])) > 1 else 1.0
        if not is_c[critical][m].any():
            raise SystemExit(f"cross-fit: no {critical} films outside the hold-out(s) "
                             f"{sorted(set(holdout) - set(holdout[m]))} to set the threshold on")
        res: dict[str, Any] = {"temperature": float(t), "fitted_on_films": int(m.sum()),
                               "fitted_on_critical": int(is_c[critical][m].sum()),
                               "fitted_on_holdouts": sorted(set(holdout[m])), "thresholds": {}, "how": {}}
        for c in crits:
            ci = labels.index(c)
            mc = m & has_c[c]
            if is_c[c][mc].any():
                pc = softmax(logit[mc], t)[:, ci]
                res["thresholds"][c] = float(threshold_for_sensitivity_rule(is_c[c][mc], pc, target, rule, margin))
                res["how"][c] = f"other hold-outs ({int(is_c[c][mc].sum())} {c} films)"
            elif c in extra and extra[c][0].any():
                ye, le = extra[c]
                res["thresholds"][c] = float(threshold_for_sensitivity_rule(ye, softmax(le, t)[:, ci], target, rule,
                                                                            margin))
                res["how"][c] = f"its own grouped cross-validation ({int(ye.sum())} {c} films)"
            else:
                res["how"][c] = "each fold's own validation threshold (no such films elsewhere)"
        res["threshold"] = res["thresholds"].get(critical, float("nan"))
        return res

    out_rows: list[dict[str, str]] = []
    info: dict[str, Any] = {"target_sensitivity": target, "sensitivity_rule": rule, "margin": margin,
                            "temperature": temperature, "per_holdout": {}}
    for h in dict.fromkeys(holdout.tolist()):
        f = fit(holdout != h)
        info["per_holdout"][h] = f
        idx = np.flatnonzero(holdout == h)
        p = softmax(logit[idx], f["temperature"])
        for i, row in zip(idx, p):
            r = dict(preds[i])
            r.update({f"p_{n}": f"{v:.6f}" for n, v in zip(labels, row)})
            urgent = False
            for c in crits:
                if not has_c[c][i]:
                    continue
                th = f["thresholds"].get(c, float(preds[i][f"threshold_{c}"]))
                r[f"threshold_{c}"] = f"{th:.6f}"
                urgent |= bool(row[labels.index(c)] >= th)
            r["urgent"] = str(int(urgent))
            r["top"] = labels[int(row.argmax())]
            out_rows.append(r)
    info["all"] = fit(np.ones(len(preds), bool))
    return out_rows, info


def crossfit_markdown(info: dict[str, Any]) -> str:
    lines = ["", f"Operating points cross-fitted over hold-outs (target sensitivity {info['target_sensitivity']}, "
             f"rule {info['sensitivity_rule']}, temperature {'fitted' if info['temperature'] else 'not fitted'}): "
             "each hold-out's temperature and threshold come from the other hold-outs' predictions only.", "",
             "| applied to | fitted on | films (COVID) | temperature | COVID threshold |", "|---|---|---|---|---|"]
    for h, f in list(info["per_holdout"].items()) + [("(shipping: all)", info["all"])]:
        lines.append(f"| {h} | {', '.join(f['fitted_on_holdouts'])} | {f['fitted_on_films']} "
                     f"({f['fitted_on_critical']}) | {f['temperature']:.3f} | {f['threshold']:.4f} |")
    others = [(h, c, f["thresholds"].get(c), f["how"][c]) for h, f in
              list(info["per_holdout"].items()) + [("(shipping: all)", info["all"])]
              for c in f.get("how", {}) if c != "COVID"]
    if others:
        lines += ["", "| applied to | critical class | threshold | fitted on |", "|---|---|---|---|"]
        lines += [f"| {h} | {c} | {'-' if th is None else f'{th:.4f}'} | {how} |" for h, c, th, how in others]
    return "\n".join(lines) + "\n"


def cmd_crossfit(args: argparse.Namespace) -> dict:
    preds = read_predictions_in([Path(p) for p in args.predictions], args.splits)
    extra = {}
    for item in args.fit_critical:
        c, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--fit-critical {item!r}: expected CLASS=PREDICTIONS.csv")
        extra[c] = read_predictions([Path(path)])
    rows, info = crossfit(preds, args.target_sensitivity, args.sensitivity_rule, args.margin,
                          temperature=not args.no_temperature, extra_fit=extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in preds for k in r))  # files from before a column existed lack it
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
    rep = write_report(out, rows, {"command": "crossfit", "predictions": [str(p) for p in args.predictions],
                                   "splits": args.splits, "crossfit": info}, args.n_boot)
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write(crossfit_markdown(info))
    log.info("%s", crossfit_markdown(info))
    return rep
