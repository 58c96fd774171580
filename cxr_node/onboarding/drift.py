"""Drift statistics: a station's recent films against its reference, by the population stability
index (PSI) of what the daemon records per film (image size, intensity, out-of-domain score, the
refusal rate on pixel rules, each class probability), with a chance guard so that a few films
cannot raise an alarm. Pure functions over result rows; :func:`cxr_node.onboarding.stations.check_drift`
records the verdicts.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from cxr_node.db.models import ImageResult
from cxr_node.eligibility.refusal import RefusalCode

PROB_PREFIX = "p:"
FEATURES_FIXED = ("ood_score", "refused", "rows", "cols", "intensity_mean", "intensity_std")


def _refusal_code(row: Any) -> RefusalCode:
    """A result row's refusal code (the stored column; an in-memory row may carry a Refusal)."""
    return RefusalCode.of(getattr(row, "refusal_code", None) or getattr(row.reason, "code", None))


def film_features(row: ImageResult, labels: Sequence[str],
                  probabilities: dict[str, float] | None = None) -> dict[str, float | None]:
    """The film's statistics; ``probabilities`` overrides the stored ones (a reference made for a
    new temperature)."""
    st = row.image_stats or {}
    # refusals that say something about the films: pixels, lung fields, out of domain (not a
    # lateral view or a non-image object in the study)
    refused = 0.0 if row.analysed else (
        1.0 if _refusal_code(row).is_pixel_rule else None)
    f: dict[str, float | None] = {
        "refused": refused,
        "ood_score": row.ood_score,
        "rows": st.get("rows"), "cols": st.get("cols"),
        "intensity_mean": st.get("mean"), "intensity_std": st.get("std"),
    }
    probs = probabilities if probabilities is not None else (row.probabilities or {})
    for label in labels:
        f[PROB_PREFIX + label] = probs.get(label) if row.analysed else None
    return f


def _edges(values: Sequence[float], bins: int | None = None) -> list[float]:
    """Bin edges from the reference: its quantiles (deciles from 100 films; distinct values only), plus one just below its
    minimum and one at its maximum, so films outside the reference's range get bins of their own
    (a station whose films were all 2048 rows sending 3000-row films moves even though the
    reference has no spread)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if bins is None:  # deciles from 100 films; fewer quantiles for fewer (a bin needs films to compare)
        bins = int(min(10, max(2, len(v) // 10)))
    qs = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    lo, hi = float(v.min()), float(v.max())
    return sorted({float(np.nextafter(lo, -np.inf)), hi, *(float(q) for q in qs)})


def _shares(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """Share of ``values`` in each bin; bin i holds (edges[i-1], edges[i]], the last one above all."""
    import numpy as np

    idx = np.searchsorted(np.asarray(edges), np.asarray(values, dtype=np.float64), side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    return list(counts / max(1.0, counts.sum()))


#: A statistic has moved when its PSI is past the threshold and chance is an unlikely explanation
#: at these film counts: PSI * n_ref * n_now / (n_ref + n_now) is about chi-square with (bins - 1)
#: degrees of freedom when nothing moved; its p-value must be below this.
MOVED_P = 0.01


def _chance(value: float, n_ref: int, n_now: int, bins: int) -> float:
    from scipy.stats import chi2

    return float(chi2.sf(value * n_ref * n_now / max(1, n_ref + n_now), max(1, bins - 1)))


def psi(expected: Sequence[float], actual: Sequence[float], n_expected: int | None = None,
        n_actual: int | None = None) -> float:
    """Population stability index of two binned distributions (shares summing to 1):
    sum (a - e) * ln(a / e); about 0.1 is a small shift, 0.25 and more a large one. With the film
    counts, each bin gets half a film added on both sides (an empty bin would make it infinite)."""
    k = len(expected)

    def smooth(shares: Sequence[float], n: int | None) -> list[float]:
        if not n:
            return [max(x, 1e-4) for x in shares]
        return [(x * n + 0.5) / (n + 0.5 * k) for x in shares]

    e, a = smooth(expected, n_expected), smooth(actual, n_actual)
    return float(sum((y - x) * math.log(y / x) for x, y in zip(e, a)))


def reference_from(rows: Iterable[ImageResult], labels: Sequence[str],
                   probabilities: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """A drift reference from films: per statistic, the bin edges (reference deciles; probabilities in
    fixed tenths) and the reference's share in each bin, plus means for the report.
    ``probabilities`` (image result id -> probabilities) replaces the stored ones, e.g. with those a
    new site calibration gives the same films, so the reference matches what the station will say."""
    import numpy as np

    probabilities = probabilities or {}
    feats = [film_features(r, labels, probabilities.get(r.id)) for r in rows]
    ref: dict[str, Any] = {"n": len(feats), "features": {}}
    for key in list(FEATURES_FIXED) + [PROB_PREFIX + x for x in labels]:
        vals = [f[key] for f in feats if f.get(key) is not None]
        if len(vals) < 5:
            continue
        if key == "refused":
            edges = [0.5]
        elif key.startswith(PROB_PREFIX):
            edges = [i / 10 for i in range(1, 10)]
        else:
            edges = _edges(vals)
        ref["features"][key] = {"edges": edges, "shares": _shares(vals, edges), "mean": float(np.mean(vals)),
                                "n": len(vals)}
    return ref


def compare(reference: dict[str, Any], rows: Sequence[ImageResult], labels: Sequence[str],
            threshold: float, calibration: str | None = None) -> dict[str, Any]:
    """PSI of every statistic in ``reference`` between the reference and ``rows``; those past
    ``threshold`` (and beyond chance: :data:`MOVED_P`) are listed in ``moved`` (largest first), with
    the means before and now. With
    ``calibration``, the probabilities compared are only those of films triaged with it (a new
    temperature moves every probability; that is not the station drifting)."""
    import numpy as np

    feats = [film_features(r, labels) for r in rows]
    if calibration is not None:
        for f, r in zip(feats, rows):
            if (r.calibration or "model") != calibration:
                for label in labels:
                    f[PROB_PREFIX + label] = None
    out: dict[str, Any] = {"n": len(feats), "reference_n": reference.get("n"), "threshold": threshold,
                           "psi": {}, "moved": []}
    for key, ref in reference.get("features", {}).items():
        vals = [f[key] for f in feats if f.get(key) is not None]
        if len(vals) < 5:
            continue
        now = _shares(vals, ref["edges"])
        value = psi(ref["shares"], now, int(ref.get("n") or 0), len(vals))
        out["psi"][key] = round(value, 4)
        occupied = sum(1 for e, a in zip(ref["shares"], now) if e > 0 or a > 0)
        p = _chance(value, int(ref.get("n") or len(vals)), len(vals), occupied)
        if value > threshold and p < MOVED_P:
            out["moved"].append({"statistic": key, "psi": round(value, 4), "p": float(f"{p:.3g}"),
                                 "reference_mean": round(ref["mean"], 4),
                                 "current_mean": round(float(np.mean(vals)), 4)})
    out["moved"].sort(key=lambda m: -m["psi"])
    return out


def describe(moved: Sequence[dict]) -> str:
    return "; ".join(f"{m['statistic']} PSI {m['psi']:.2f} (mean {m['reference_mean']:g} -> {m['current_mean']:g})"
                     for m in moved)
