"""The abnormality head (a logistic regression weighted equally per source x class) and the gate (a
Ledoit-Wolf Mahalanobis distance on the same features), fitted for a fold."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

import numpy as np

from training.evaluate.abnormal.features import L2_GRID, POOLS, Features, is_abnormal

log = logging.getLogger("training.evaluate.abnormal")

def cell_weights(rows: Sequence[dict]) -> np.ndarray:
    """Every source x {Normal, Abnormal} cell gets the same total weight; mean 1."""
    cells = [(r["source"], is_abnormal(r["label"])) for r in rows]
    n = Counter(cells)
    w = np.array([1.0 / (len(n) * n[c]) for c in cells])
    return w * (len(w) / w.sum())


def mean_source_auc(rows: Sequence[dict], score: np.ndarray) -> tuple[float, dict[str, float]]:
    from cxr_node.model.calibration import roc_auc

    per = {}
    for src in sorted({r["source"] for r in rows}):
        i = [k for k, r in enumerate(rows) if r["source"] == src]
        y = np.array([is_abnormal(rows[k]["label"]) for k in i])
        if 0 < y.sum() < len(y):
            per[src] = float(roc_auc(y, score[i]))
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def fit_abnormal(F: Features, fset: str, tr: Sequence[dict], va: Sequence[dict], grid: Sequence[float] = L2_GRID
                 ) -> dict[str, Any]:
    """The head on ``tr`` for each L2 of ``grid``; the one with the best mean per-source val AUC."""
    from cxr_node.model.abnormality import LABELS as ABN
    from cxr_node.model.adaptation import fit_logistic_head

    xt, yt = F.x(fset, tr), np.array([int(is_abnormal(r["label"])) for r in tr])
    xv = F.x(fset, va)
    best = None
    tried = {}
    head = None
    for l2 in sorted(grid, reverse=True):  # strongest penalty first, each fit starting from the last
        head = fit_logistic_head(xt, yt, ABN, l2=l2, weights=cell_weights(tr), init=head)
        s = head.logits(xv)
        auc, per = mean_source_auc(va, s[:, 1] - s[:, 0])
        tried[str(l2)] = {"val_mean_source_auc": auc, "per_source": per}
        if best is None or auc > best[0]:
            best = (auc, l2, head)
    assert best is not None
    return {"head": best[2], "l2": best[1], "val_mean_source_auc": best[0], "grid": tried,
            "n_train": len(tr), "n_val": len(va), "train_cells": {f"{s}/{'abnormal' if a else 'normal'}": n
                                                                   for (s, a), n in sorted(Counter(
                                                                       (r["source"], is_abnormal(r["label"]))
                                                                       for r in tr).items())}}


def p_abnormal(head, x: np.ndarray) -> np.ndarray:
    s = head.logits(x)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e[:, 1] / e.sum(axis=1)


def fold_rows(rows: Sequence[dict], F: Features, h: str, pool: str | None = None
              ) -> tuple[list[dict], list[dict], list[dict]]:
    """(held-out films to predict, head training films, head validation films) of hold-out ``h``."""
    from training.evaluate.frozen import seen_copies
    from training.evaluate.lso.folds import held_out, training_rows

    seen = seen_copies(rows)
    held = held_out(h, rows)
    pred = [r for r in held if r["id"] in F.index and (h == "covid19-radiography" or r["id"] not in seen)]
    sources = POOLS[pool] if pool else None
    cand = [r for r in training_rows(rows, held, list(sources or []), None, None, 0) if r["id"] in F.index]
    return pred, [r for r in cand if r["split"] == "train"], [r for r in cand if r["split"] == "val"]


# --------------------------------------------------------------------------- the gate


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows (training.evaluate.ood's, with the sum over rows in closed form:
    sum_k ||x_k x_k' - S||^2 = sum_k ||x_k||^4 - n ||S||^2)."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    beta = ((np.einsum("ij,ij->i", x, x) ** 2).sum() - n * (s ** 2).sum()) / (d * n * n)
    shrink = min(max(beta, 0.0), delta) / delta if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(d)


def fit_gate(F: Features, tr: Sequence[dict], va: Sequence[dict], percentile: float = 97.5) -> dict[str, Any]:
    """One Gaussian per source x label cell of ``tr`` (final features, shared covariance); threshold the
    largest per-source ``percentile`` of the ``va`` films' scores."""
    x = F.x("final", tr)
    cells = sorted({(r["source"], r["label"]) for r in tr})
    ci = np.array([cells.index((r["source"], r["label"])) for r in tr])
    means = np.stack([x[ci == k].mean(0) for k in range(len(cells))])
    precision = np.linalg.inv(ledoit_wolf(x - means[ci]))
    g = {"means": means, "precision": precision, "cells": [f"{s}/{lab}" for s, lab in cells]}
    sv = gate_score(g, F.x("final", va))
    per = {src: float(np.percentile(sv[[k for k, r in enumerate(va) if r["source"] == src]], percentile))
           for src in sorted({r["source"] for r in va})}
    g.update(threshold=max(per.values()), per_source_percentile=per, percentile=percentile, fit_films=len(tr))
    return g


def gate_score(g: dict, x: np.ndarray) -> np.ndarray:
    """Smallest Mahalanobis distance to a cell mean (one matrix product per cell)."""
    m = np.stack([(((x - mu) @ g["precision"]) * (x - mu)).sum(1) for mu in g["means"]], axis=1)
    return np.sqrt(m.clip(0).min(1))
