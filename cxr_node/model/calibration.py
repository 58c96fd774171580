"""Classification metrics and calibration in numpy/scipy only (no scikit-learn dependency).

Shared by training (``training.train.calibrate``, ``training.evaluate``; ``training.evaluate.metrics`` re-exports
these) and the node's own site onboarding (``cxr-node performance``, ``cxr-node calibrate-site``),
so a site calibration is fitted by exactly the code that calibrated the model.

All functions take integer targets ``y`` (N,) and probabilities ``p`` (N, K) or scores (N,).
:func:`fit_operating_points` is the calibration itself: temperature scaling plus per-class
operating points from logits and labels.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC AUC via the Mann-Whitney U statistic (ties count one half). NaN if one class is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a point for each distinct score (+ the origin)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.where(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (1 + distinct) - tps
    P, N = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / P]
    fpr = np.r_[0.0, fps / N]
    thr = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thr


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean one-vs-rest AUC over classes present with both positives and negatives."""
    aucs = [roc_auc(y == k, p[:, k]) for k in range(p.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, dtype=int), np.asarray(pred, dtype=int)), 1)
    return cm


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_stats(y_pos: np.ndarray, pred_pos: np.ndarray) -> dict[str, float]:
    y_pos, pred_pos = np.asarray(y_pos, bool), np.asarray(pred_pos, bool)
    tp = int((y_pos & pred_pos).sum())
    fp = int((~y_pos & pred_pos).sum())
    fn = int((y_pos & ~pred_pos).sum())
    tn = int((~y_pos & ~pred_pos).sum())
    sens, ppv = _div(tp, tp + fn), _div(tp, tp + fp)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": sens, "specificity": _div(tn, tn + fp),
            "ppv": ppv, "npv": _div(tn, tn + fn),
            "f1": _div(2 * tp, 2 * tp + fp + fn)}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> tuple[float, dict[str, list]]:
    """Top-label ECE with equal-width confidence bins; also returns the reliability table."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    table: dict[str, list] = {"bin_lower": [], "bin_upper": [], "count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        table["bin_lower"].append(float(edges[b]))
        table["bin_upper"].append(float(edges[b + 1]))
        table["count"].append(n)
        if n:
            c, a = float(conf[m].mean()), float(correct[m].mean())
            ece += n / len(y) * abs(c - a)
            table["confidence"].append(c)
            table["accuracy"].append(a)
        else:
            table["confidence"].append(None)
            table["accuracy"].append(None)
    return float(ece), table


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, Any]:
    """Percentile bootstrap CIs (resampling films) for each one-vs-rest AUC and the macro AUC."""
    rng = np.random.default_rng(seed)
    k = p.shape[1]
    n = len(y)
    per: list[list[float]] = [[] for _ in range(k)]
    macro: list[float] = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        yb, pb = y[i], p[i]
        vals = [roc_auc(yb == c, pb[:, c]) for c in range(k)]
        for c, v in enumerate(vals):
            if not math.isnan(v):
                per[c].append(v)
        ok = [v for v in vals if not math.isnan(v)]
        if ok:
            macro.append(float(np.mean(ok)))

    def ci(v: Sequence[float]) -> list[float]:
        if not v:
            return [float("nan"), float("nan")]
        return [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]

    return {"per_class": [ci(v) for v in per], "macro": ci(macro), "n_boot": n_boot, "seed": seed}


def logits_from(probabilities: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """Logits (up to a constant per row, which softmax ignores) of probabilities that were
    ``softmax(logits, temperature)``: what a stored result can be re-calibrated from."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, None)
    t = np.asarray(temperature, dtype=np.float64)
    return np.log(p) * (t[:, None] if t.ndim == 1 else t)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising validation NLL (bounded scalar search over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: nll(logits, y, math.exp(lt)), bounds=(-3.0, 3.0), method="bounded",
                          options={"xatol": 1e-4})
    return float(math.exp(res.x))


def threshold_for_sensitivity(y_pos: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity(score >= t) >= target (most specific such point)."""
    y_pos = np.asarray(y_pos, bool)
    s = np.sort(np.asarray(score, dtype=np.float64)[y_pos])[::-1]
    if s.size == 0:
        raise ValueError("no positive cases to set a sensitivity threshold")
    need = int(math.ceil(target * s.size - 1e-9))
    need = min(max(need, 1), s.size)
    return float(s[need - 1])


def threshold_max_youden(y_pos: np.ndarray, score: np.ndarray) -> float:
    fpr, tpr, thr = roc_curve(y_pos, score)
    j = tpr - fpr
    i = int(np.argmax(j[1:])) + 1
    return float(thr[i])


def summarize(y: np.ndarray, p: np.ndarray, labels: Sequence[str], thresholds: dict[str, float] | None = None,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything metrics.json holds. Per-class binary stats use the class's operating threshold
    when one is given (one-vs-rest, p >= t), else the argmax prediction."""
    y = np.asarray(y, dtype=int)
    k = len(labels)
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    per_class: dict[str, Any] = {}
    f1s = []
    for c, name in enumerate(labels):
        auc = roc_auc(y == c, p[:, c])
        argmax_stats = binary_stats(y == c, pred == c)
        f1s.append(argmax_stats["f1"])
        entry: dict[str, Any] = {"auc": auc, "n": int((y == c).sum()), "argmax": argmax_stats}
        if thresholds and name in thresholds:
            entry["threshold"] = float(thresholds[name])
            entry["at_threshold"] = binary_stats(y == c, p[:, c] >= thresholds[name])
        ops = entry.get("at_threshold", argmax_stats)
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            entry[key] = ops[key]
        per_class[name] = entry
    ece, rel = expected_calibration_error(y, p)
    ci = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    for c, name in enumerate(labels):
        per_class[name]["auc_ci95"] = ci["per_class"][c]
    return {
        "n": int(len(y)),
        "labels": list(labels),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "macro_auc": macro_auc(y, p),
        "macro_auc_ci95": ci["macro"],
        "macro_f1": float(np.nanmean(f1s)) if f1s else float("nan"),
        "ece": ece,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows = true label, columns = predicted (argmax)",
        "reliability": rel,
        "bootstrap": {"n_boot": ci["n_boot"], "seed": ci["seed"], "method": "percentile, films resampled"},
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> list[float]:
    """Wilson score 95% interval for a proportion k/n ([nan, nan] when n = 0)."""
    if n <= 0:
        return [float("nan"), float("nan")]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(max(0.0, c - h)), float(min(1.0, c + h))]


def rate(k: int, n: int) -> dict[str, Any]:
    """``{"value", "k", "n", "ci95"}`` for k of n (Wilson 95%; value and interval None when n = 0)."""
    return {"value": (k / n) if n else None, "k": k, "n": n, "ci95": wilson_interval(k, n) if n else None}


def json_safe(x: Any) -> Any:
    """NaN and infinities -> None and numpy scalars -> Python numbers, recursively, so JSON is valid."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if hasattr(x, "item"):  # numpy scalars
        return json_safe(x.item())
    return x


def proportion(mask: np.ndarray) -> dict[str, Any]:
    """``{"k", "n", "rate", "ci95"}`` (Wilson) for a boolean array."""
    m = np.asarray(mask, bool)
    k, n = int(m.sum()), int(m.size)
    return {"k": k, "n": n, "rate": _div(k, n), "ci95": wilson_interval(k, n)}


def bootstrap_binary_auc(y_pos: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0,
                         groups: np.ndarray | None = None) -> dict[str, Any]:
    """Binary AUC with a percentile bootstrap 95% CI; resamples ``groups`` (e.g. patients) when given,
    else films."""
    y, s = np.asarray(y_pos, bool), np.asarray(score, np.float64)
    auc = roc_auc(y, s)
    if math.isnan(auc):
        return {"auc": auc, "ci95": [float("nan"), float("nan")], "n_pos": int(y.sum()), "n_neg": int((~y).sum())}
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y))]
    else:
        g = np.asarray(groups)
        units = [np.flatnonzero(g == u) for u in np.unique(g)]
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(units), len(units))
        i = np.concatenate([units[j] for j in pick])
        v = roc_auc(y[i], s[i])
        if not math.isnan(v):
            vals.append(v)
    ci = [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))] if vals else [float("nan")] * 2
    return {"auc": auc, "ci95": ci, "n_pos": int(y.sum()), "n_neg": int((~y).sum()), "n_boot": n_boot,
            "resampled": "groups" if groups is not None else "films"}


def binary_ece(y_pos: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Calibration error of a one-vs-rest probability: sum over equal-width bins of
    (bin share) * |mean p - observed rate|."""
    y, p = np.asarray(y_pos, np.float64), np.asarray(p, np.float64)
    if y.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    return float(sum((idx == b).sum() / y.size * abs(p[idx == b].mean() - y[idx == b].mean())
                     for b in range(n_bins) if (idx == b).any()))


def threshold_for_sensitivity_rule(y_pos: np.ndarray, score: np.ndarray, target: float, rule: str = "point",
                                   margin: float = 0.0) -> float:
    """Critical-class threshold by ``rule``:

    * ``point``: the highest threshold with sensitivity >= ``target`` (v1/v2's rule; sits at the edge);
    * ``margin``: the same for ``target + margin`` (capped below 1);
    * ``wilson``: the highest threshold whose sensitivity's lower Wilson 95% bound is >= ``target``
      (falls back to the lowest score if no threshold gets there).
    """
    if rule == "point":
        return threshold_for_sensitivity(y_pos, score, target)
    if rule == "margin":
        return threshold_for_sensitivity(y_pos, score, min(target + margin, 1.0))
    if rule != "wilson":
        raise ValueError(f"unknown sensitivity rule {rule!r} (point, margin, wilson)")
    pos = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(y_pos, bool)])[::-1]
    if pos.size == 0:
        raise ValueError("no positive cases to set a sensitivity threshold")
    for k in range(1, pos.size + 1):  # flag the k highest-scoring positives
        if wilson_interval(k, pos.size)[0] >= target:
            return float(pos[k - 1])
    return float(pos[-1])


def fit_operating_points(logits: np.ndarray, y: np.ndarray, labels: Sequence[str], critical: Sequence[str],
                         target_sensitivity: float = 0.95, rule: str = "point", margin: float = 0.0,
                         critical_scores: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                         log=None) -> dict[str, Any]:
    """Temperature scaling plus per-class operating points on (logits, integer labels).

    * temperature T minimises the negative log-likelihood of ``softmax(logits / T)``;
    * each critical class gets the highest threshold meeting ``target_sensitivity`` under ``rule``
      (:func:`threshold_for_sensitivity_rule`), on ``critical_scores[name]`` = (is that class, its
      probability) when given (e.g. pooled leave-source-out predictions), else on these films;
    * every other class gets the threshold maximising Youden's J.

    A class with no positives or no negatives gets no threshold. Labels ``y`` outside
    ``range(len(labels))`` (films of no model class) count as negatives for every class.
    Returns ``{"temperature", "thresholds", "operating_points", "n", "nll_before", "nll_after",
    "ece_before", "ece_after"}``.
    """
    y = np.asarray(y, dtype=int)
    logits = np.asarray(logits, dtype=np.float64)
    known = (y >= 0) & (y < len(labels))
    t = fit_temperature(logits[known], y[known]) if known.any() else 1.0
    p0, p = softmax(logits, 1.0), softmax(logits, t)
    critical_scores = critical_scores or {}
    thresholds: dict[str, float] = {}
    points: dict[str, Any] = {}
    for k, name in enumerate(labels):
        yk = y == k
        if not yk.any() or yk.all():
            if log:
                log.warning("class %s: no positives or no negatives; no threshold", name)
            continue
        if name in critical:
            desc = {"point": f"sensitivity >= {target_sensitivity}",
                    "margin": f"sensitivity >= {target_sensitivity} + margin {margin}",
                    "wilson": f"lower Wilson 95% bound of sensitivity >= {target_sensitivity}"}[rule]
            if name in critical_scores:
                cy, cs = critical_scores[name]
                th = threshold_for_sensitivity_rule(cy, cs, target_sensitivity, rule, margin)
                desc += f" on {len(cy)} other predictions"
            else:
                th = threshold_for_sensitivity_rule(yk, p[:, k], target_sensitivity, rule, margin)
        else:
            th = threshold_max_youden(yk, p[:, k])
            desc = "max Youden J"
        thresholds[name] = float(min(max(th, 0.0), 1.0))
        st = binary_stats(yk, p[:, k] >= thresholds[name])
        points[name] = {"threshold": thresholds[name], "rule": desc, "sensitivity": st["sensitivity"],
                        "specificity": st["specificity"], "ppv": st["ppv"], "npv": st["npv"]}
        if log:
            log.info("%s: threshold %.4f (%s) -> sensitivity %.3f specificity %.3f", name, thresholds[name], desc,
                     st["sensitivity"], st["specificity"])
    ece0 = ece1 = float("nan")
    if known.any():
        ece0, _ = expected_calibration_error(y[known], p0[known])
        ece1, _ = expected_calibration_error(y[known], p[known])
    return {"temperature": t, "thresholds": thresholds, "operating_points": points, "n": int(len(y)),
            "nll_before": nll(logits[known], y[known], 1.0) if known.any() else float("nan"),
            "nll_after": nll(logits[known], y[known], t) if known.any() else float("nan"),
            "ece_before": ece0, "ece_after": ece1}
