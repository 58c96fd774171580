"""Logistic heads on a classifier's frozen penultimate features.

Shared by the site adaptation (``cxr-node adapt-site``) and the frozen-feature configuration of
the model's training protocol (``python -m training.evaluate.frozen``): a multinomial logistic regression
on standardised features, fitted by L-BFGS with an L2 penalty and optional per-film weights. The
head is stored as plain numbers (feature mean and scale, weights, bias), so it needs no pickling and
folds into the network's last linear layer exactly (:meth:`LogisticHead.as_linear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class LogisticHead:
    labels: tuple[str, ...]
    mean: np.ndarray   # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (K, D) on standardised features
    bias: np.ndarray   # (K,)
    l2: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) acting on the raw features: the same logits as :meth:`logits`."""
        w = self.weight / self.scale[None, :]
        return w, self.bias - w @ self.mean

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weight": self.weight.tolist(), "bias": self.bias.tolist(), "l2": self.l2}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LogisticHead":
        return cls(tuple(d["labels"]), np.asarray(d["mean"], dtype=np.float64),
                   np.asarray(d["scale"], dtype=np.float64), np.asarray(d["weight"], dtype=np.float64),
                   np.asarray(d["bias"], dtype=np.float64), float(d["l2"]))


def fit_logistic_head(features: np.ndarray, y: np.ndarray, labels: Sequence[str], l2: float = 1.0,
                      weights: np.ndarray | None = None, max_iter: int = 500,
                      init: LogisticHead | None = None) -> LogisticHead:
    """Multinomial logistic regression of ``y`` (indices into ``labels``) on ``features``.

    ``init``: a head on the same features to start from (a path of L2 values, strongest first).
    Loss: the weighted mean cross-entropy (``weights`` default 1, rescaled to mean 1) plus
    ``l2 / (2 N)`` times the squared weights (not the bias): ``l2`` is the inverse of the usual C."""
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = len(labels)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError("features must be (N, D) with one label per row")
    if y.min() < 0 or y.max() >= k:
        raise ValueError("labels out of range")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-6] = 1.0
    z = (x - mean) / scale
    n, d = z.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w * (n / w.sum())
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[:k * d].reshape(k, d)
        b = theta[k * d:]
        s = z @ W.T + b
        s -= s.max(1, keepdims=True)
        ls = s - np.log(np.exp(s).sum(1, keepdims=True))
        loss = -(w * (onehot * ls).sum(1)).sum() / n + l2 / (2 * n) * (W ** 2).sum()
        g = (np.exp(ls) - onehot) * w[:, None] / n
        gW = g.T @ z + l2 / n * W
        return float(loss), np.concatenate([gW.ravel(), g.sum(0)])

    x0 = np.zeros(k * d + k) if init is None else np.concatenate([init.weight.ravel(), init.bias])  # warm start
    res = minimize(f, x0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    theta = res.x
    return LogisticHead(tuple(labels), mean, scale, theta[:k * d].reshape(k, d), theta[k * d:], float(l2))


def balanced_weights(labels: Sequence[str], sources: Sequence[str] | None = None) -> np.ndarray:
    """Per-film weights giving each class an equal share and, with ``sources``, each source an equal
    share within its class (``training.train``'s ``--balance source,class``); mean 1."""
    from collections import Counter

    labels = list(labels)
    n_c = Counter(labels)
    if sources is None:
        w = np.array([1.0 / n_c[c] for c in labels])
    else:
        n_sc = Counter(zip(sources, labels))
        s_c = Counter(c for (_, c) in n_sc)
        w = np.array([1.0 / (s_c[c] * n_sc[(s, c)]) for s, c in zip(sources, labels)])
    return w * (len(w) / w.sum())


# --------------------------------------------------------------------------- site heads (adapt-site)

L2_GRID = (1.0, 10.0, 100.0, 1000.0)


def grouped_folds(groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per film; every film of a group (patient) in one fold."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    of = {g: i % k for i, g in enumerate(uniq)}
    return np.array([of[g] for g in groups])


def fit_binary(features: np.ndarray, y_pos: np.ndarray, l2: float) -> LogisticHead:
    return fit_logistic_head(features, y_pos.astype(int), ("rest", "positive"), l2=l2,
                             weights=balanced_weights(["p" if v else "n" for v in y_pos]))


def binary_score(head: LogisticHead, features: np.ndarray) -> np.ndarray:
    """The head's logit of the positive class against the rest."""
    s = head.logits(features)
    return s[:, 1] - s[:, 0]


def choose_l2(features: np.ndarray, y_pos: np.ndarray, groups: Sequence[str], seed: int = 0, k: int = 3) -> float:
    """L2 by inner patient-grouped cross-validation (AUC), from :data:`L2_GRID`."""
    from cxr_node.model.calibration import roc_auc

    folds = grouped_folds(groups, k, seed + 1)
    best = (-1.0, L2_GRID[-1])
    for l2 in L2_GRID:
        s = np.zeros(len(y_pos))
        ok = True
        for f in range(k):
            tr = folds != f
            if len(set(y_pos[tr])) < 2:
                ok = False
                break
            s[~tr] = binary_score(fit_binary(features[tr], y_pos[tr], l2), features[~tr])
        if ok:
            auc = roc_auc(y_pos, s)
            if auc > best[0] + 1e-9:
                best = (auc, l2)
    return best[1]


def platt(score: np.ndarray, y_pos: np.ndarray) -> tuple[float, float]:
    """(a, b) with p = sigmoid(a * score + b) fitted by maximum likelihood (the calibration folded in)."""
    from scipy.optimize import minimize

    y = y_pos.astype(float)

    def f(t: np.ndarray) -> tuple[float, np.ndarray]:
        z = t[0] * score + t[1]
        p = 1.0 / (1.0 + np.exp(-z))
        eps = 1e-12
        loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
        g = p - y
        return float(loss), np.array([np.mean(g * score), np.mean(g)])

    r = minimize(f, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(r.x[0]), float(r.x[1])


def paired_auc_difference(y_pos: np.ndarray, before: np.ndarray, after: np.ndarray, groups: Sequence[str],
                          n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC(after) - AUC(before) on the same films, with a patient-group bootstrap 95% interval."""
    from cxr_node.model.calibration import roc_auc

    y_pos = np.asarray(y_pos, bool)
    g = np.asarray(groups)
    uniq = np.unique(g)
    idx = {u: np.flatnonzero(g == u) for u in uniq}
    rng = np.random.default_rng(seed)
    a0, a1 = roc_auc(y_pos, before), roc_auc(y_pos, after)
    diffs = []
    for _ in range(n_boot):
        take = np.concatenate([idx[u] for u in rng.choice(uniq, len(uniq), replace=True)])
        yb = y_pos[take]
        if yb.all() or not yb.any():
            continue
        diffs.append(roc_auc(yb, after[take]) - roc_auc(yb, before[take]))
    lo, hi = (np.quantile(diffs, [0.025, 0.975]).tolist() if diffs else [float("nan"), float("nan")])
    return {"auc_before": float(a0), "auc_after": float(a1), "difference": float(a1 - a0), "ci95": [lo, hi],
            "n_pos": int(y_pos.sum()), "n_neg": int((~y_pos).sum()), "n_boot": len(diffs)}


def cross_validate_class(features: np.ndarray, y_pos: np.ndarray, model_p: np.ndarray, model_threshold: float,
                         groups: Sequence[str], target: float, folds: int = 5, seed: int = 0,
                         n_boot: int = 1000) -> dict[str, Any]:
    """Before (the model's p and threshold) and after (a site head, out of fold) for one critical
    class, by patient-grouped ``folds``-fold cross-validation on the site's labelled films: AUCs and
    their paired difference with a bootstrap interval; sensitivity and specificity at the target,
    the head's threshold chosen inside each training fold (so the figures are out of fold too)."""
    from cxr_node.model.calibration import binary_stats, threshold_for_sensitivity

    fold = grouped_folds(groups, folds, seed)
    oof = np.zeros(len(y_pos))
    flag = np.zeros(len(y_pos), bool)
    for f in range(folds):
        tr = fold != f
        if len(set(y_pos[tr])) < 2 or not (~tr).any():
            raise ValueError("a training fold lacks one of the classes: too few labelled films")
        gtr = [g for g, t in zip(groups, tr) if t]
        l2 = choose_l2(features[tr], y_pos[tr], gtr, seed)
        head = fit_binary(features[tr], y_pos[tr], l2)
        s_tr = binary_score(head, features[tr])
        a, b = platt(s_tr, y_pos[tr])
        p_tr = 1 / (1 + np.exp(-(a * s_tr + b)))
        th = threshold_for_sensitivity(y_pos[tr], p_tr, target)
        p_te = 1 / (1 + np.exp(-(a * binary_score(head, features[~tr]) + b)))
        oof[~tr] = p_te
        flag[~tr] = p_te >= th
    diff = paired_auc_difference(y_pos, model_p, oof, groups, n_boot=n_boot, seed=seed)
    return {"paired_auc": diff,
            "before_at_threshold": binary_stats(y_pos, model_p >= model_threshold),
            "after_at_target": binary_stats(y_pos, flag), "target_sensitivity": target, "folds": folds,
            "out_of_fold": oof}


def fit_site_head(features: np.ndarray, y_pos: np.ndarray, groups: Sequence[str], target: float,
                  seed: int = 0) -> dict[str, Any]:
    """The head stored for one critical class: fitted on every labelled film, Platt scale from
    out-of-fold scores folded into its weights, threshold at ``target`` sensitivity on those
    out-of-fold probabilities. Returns {"weight": (D,), "bias": float, "threshold", "l2"} acting on
    the raw features: p = sigmoid(weight . x + bias)."""
    from cxr_node.model.calibration import threshold_for_sensitivity

    l2 = choose_l2(features, y_pos, groups, seed)
    fold = grouped_folds(groups, 5, seed)
    oof = np.zeros(len(y_pos))
    for f in range(5):
        tr = fold != f
        if len(set(y_pos[tr])) < 2:
            raise ValueError("too few labelled films for a site head")
        oof[~tr] = binary_score(fit_binary(features[tr], y_pos[tr], l2), features[~tr])
    a, b = platt(oof, y_pos)
    head = fit_binary(features, y_pos, l2)
    W, B = head.as_linear()
    w = a * (W[1] - W[0])
    bias = a * float(B[1] - B[0]) + b
    p_oof = 1 / (1 + np.exp(-(a * oof + b)))
    return {"weight": w, "bias": float(bias), "threshold": float(threshold_for_sensitivity(y_pos, p_oof, target)),
            "l2": l2, "platt": [a, b]}


def apply_site_heads(probabilities: Sequence[float], labels: Sequence[str], features: np.ndarray,
                     heads: dict[str, dict[str, Any]]) -> tuple[float, ...]:
    """The model's probabilities with each critical class that has a site head replaced by the head's
    (calibrated) probability; the other classes share what is left in their proportions (if the
    heads' probabilities sum above 1, they are scaled to 1 and the others get 0)."""
    p = np.asarray(probabilities, dtype=np.float64).copy()
    x = np.asarray(features, dtype=np.float64).ravel()
    idx = [labels.index(c) for c in heads if c in labels]
    for c in heads:
        if c in labels:
            h = heads[c]
            z = float(np.dot(np.asarray(h["weight"], dtype=np.float64), x) + float(h["bias"]))
            p[labels.index(c)] = 1.0 / (1.0 + np.exp(-z))
    crit_mass = p[idx].sum()
    rest = [i for i in range(len(p)) if i not in idx]
    if crit_mass >= 1.0:
        p[idx] /= crit_mass
        p[rest] = 0.0
    else:
        others = p[rest].sum()
        p[rest] = p[rest] * ((1.0 - crit_mass) / others) if others > 0 else (1.0 - crit_mass) / max(len(rest), 1)
    return tuple(float(v) for v in p)
