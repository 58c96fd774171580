"""The decision, on the test split once (``decide``): cross-fitted operating point and gate threshold,
the protocol's criteria with intervals, the paired AUC difference and the ship rule."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.evaluate.abnormal.features import AUC_HOLDOUTS, HOLDOUTS
from training.evaluate.abnormal.lso import plain, pooled_auc, read_csv

log = logging.getLogger("training.evaluate.abnormal")

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
    (dest / "decision.json").write_text(json.dumps(plain(out), indent=1) + "\n", encoding="utf-8")
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
