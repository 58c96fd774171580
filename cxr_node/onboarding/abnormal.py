"""Site onboarding on the abnormal axis: a model with an abnormality output (v5,
:mod:`cxr_node.model.abnormality`) raises the urgent flag when p(abnormal) is at or above one
operating point. A station's readers label films Normal or Abnormal (a pattern label, or Other,
counts as abnormal: :func:`cxr_node.onboarding.feedback.is_abnormal`); from those labels:

* ``calibrate-site`` sets the station's **operating point** (:func:`calibrate`). Rule: the highest
  threshold t at which at least ``target`` of the station's abnormal films have p(abnormal) >= t
  (:func:`cxr_node.model.calibration.threshold_for_sensitivity`, the rule today's critical classes
  use), reported with the Wilson 95% intervals of sensitivity and specificity at t. Refused below
  ``min_per_class`` abnormal or normal films, and when the labels cannot support it: t at 0 or 1,
  or a bootstrap 95% interval of t (films resampled, the rule repeated) wider than
  :data:`MAX_THRESHOLD_SPREAD`. Only films whose p(abnormal) is the model's count (not those a site
  head scored). The temperature and the pattern thresholds stay as they are in force.
* ``adapt-site`` fits a **site head** on the abnormal axis (:func:`adapt`): a logistic head on the
  model's frozen penultimate features (:func:`cxr_node.model.adaptation.fit_site_head`), kept only
  if the lower bound of the paired patient-bootstrap 95% interval of its out-of-fold AUC gain over
  the model's p(abnormal) is above zero (champion and challenger). Its minimum is
  :data:`ADAPT_MIN_PER_CLASS` abnormal and normal films (docs/onboarding-abnormal.md: the smallest the
  gate keeps safe in the simulation on ../shared).

Both are stored where today's are (``site_calibrations.report["abnormal"]``; ``site_heads.heads``
under :data:`HEAD_KEY`), versioned and bound to the weights; :func:`apply` is what the pipeline does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from cxr_node.onboarding.feedback import is_abnormal

#: the key of the abnormal-axis head in ``site_heads.heads`` (not a class label: never a pattern)
HEAD_KEY = "Abnormal"
#: a threshold this close to 0 or 1 flags every film or none
THRESHOLD_EDGE = 0.001
N_BOOT = 200
MAX_THRESHOLD_SPREAD = 0.5
#: adapt-site's default minimum of labelled abnormal films and of normal films on this axis
#: (``[onboarding] adapt_min_per_class``; measured in docs/onboarding-abnormal.md)
ADAPT_MIN_PER_CLASS = 30
RULE = "highest threshold with sensitivity >= {target} on the station's abnormal films"


class Refused(ValueError):
    """Too few labels, or labels that cannot support a fit; the message says which."""


def by_head(calibration: str | None) -> bool:
    """Whether a film was triaged by a site head (its stored p(abnormal) is the head's, not the model's)."""
    return " head v" in (calibration or "")


def usable(films: Sequence) -> tuple[list, np.ndarray, np.ndarray, dict[str, int]]:
    """The labelled films (``LabelledFilm``-like: ``label``, ``abnormal``, ``calibration``) that
    count on this axis, their truth (abnormal?), the model's p(abnormal), and how many were left out."""
    kept, skipped = [], {"no p(abnormal)": 0, "scored by a site head": 0}
    for f in films:
        if getattr(f, "abnormal", None) is None:
            skipped["no p(abnormal)"] += 1
        elif by_head(getattr(f, "calibration", None)):
            skipped["scored by a site head"] += 1
        elif is_abnormal(f.label) is not None:
            kept.append(f)
    y = np.array([bool(is_abnormal(f.label)) for f in kept], dtype=bool)
    p = np.array([float(f.abnormal) for f in kept], dtype=np.float64)
    return kept, y, p, skipped


def counts(y: np.ndarray) -> dict[str, int]:
    return {"abnormal": int(y.sum()), "normal": int((~y).sum())}


def check_counts(y: np.ndarray, min_per_class: int, what: str) -> None:
    c = counts(y)
    if c["abnormal"] < min_per_class or c["normal"] < min_per_class:
        raise Refused(f"too few labelled films to {what}: abnormal {c['abnormal']}, normal {c['normal']} (at least "
                      f"{min_per_class} of each needed; a film labelled with a pattern or Other counts as abnormal)")


def operating_point(y: np.ndarray, p: np.ndarray, target: float) -> float:
    from cxr_node.model.calibration import threshold_for_sensitivity

    return float(min(max(threshold_for_sensitivity(y, p, target), 0.0), 1.0))


def figures(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """At ``threshold`` (flag when p >= t): sensitivity and specificity with Wilson 95% intervals,
    the share flagged; and the AUC of p(abnormal) with a bootstrap interval (it does not depend on t)."""
    from cxr_node.model.calibration import bootstrap_binary_auc, rate

    flag = p >= threshold
    auc = bootstrap_binary_auc(y, p, n_boot=n_boot, seed=seed)
    return {"threshold": float(threshold), "sensitivity": rate(int((y & flag).sum()), int(y.sum())),
            "specificity": rate(int((~y & ~flag).sum()), int((~y).sum())),
            "flagged": rate(int(flag.sum()), int(flag.size)), "auc": {"value": auc["auc"], "ci95": auc["ci95"]}}


def implausible(y: np.ndarray, p: np.ndarray, target: float, threshold: float, seed: int = 0) -> list[str]:
    """Why an operating point must not be stored (empty: it may be)."""
    if threshold <= THRESHOLD_EDGE or threshold >= 1 - THRESHOLD_EDGE:
        return [f"the operating point {threshold:.4f} is at the edge of 0..1: it flags every film or none"]
    rng = np.random.default_rng(seed)
    ts = []
    for _ in range(N_BOOT):
        i = rng.integers(0, len(y), len(y))
        if y[i].any():
            ts.append(operating_point(y[i], p[i], target))
    lo, hi = np.percentile(ts, [2.5, 97.5])
    if hi - lo > MAX_THRESHOLD_SPREAD:
        return [f"the operating point's bootstrap 95% interval is {lo:.3f}-{hi:.3f} (wider than "
                f"{MAX_THRESHOLD_SPREAD:g}): the labels cannot support it"]
    return []


def calibrate(films: Sequence, *, target: float, min_per_class: int, before_threshold: float,
              before_name: str) -> dict[str, Any]:
    """The station's operating point on p(abnormal) (module docstring). Raises :class:`Refused`
    below the minimum; the result's ``problems`` say why the labels cannot support it (if so)."""
    kept, y, p, skipped = usable(films)
    check_counts(y, min_per_class, "calibrate the abnormal operating point")
    t = operating_point(y, p, target)
    before = figures(y, p, before_threshold)
    before["calibration"] = before_name
    return {"threshold": t, "rule": RULE.format(target=target), "films": len(kept), "counts": counts(y),
            "skipped": skipped, "before": before, "after": figures(y, p, t),
            "problems": implausible(y, p, target, t), "image_result_ids": [f.image_result_id for f in kept]}


def threshold_of(calibration) -> float | None:
    """The abnormal operating point a stored site calibration carries (None: it has none)."""
    if calibration is None:
        return None
    t = ((getattr(calibration, "report", None) or {}).get("abnormal") or {}).get("threshold")
    return None if t is None else float(t)


# --------------------------------------------------------------------------- site head


def adapt(features: np.ndarray, y: np.ndarray, p_model: np.ndarray, threshold: float, groups: Sequence[str], *,
          target: float, min_per_class: int, n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, Any], dict | None]:
    """Before/after by patient-grouped cross-validation and the champion/challenger gate on the
    abnormal axis; returns (the class entry of the report, the head to store or None)."""
    from cxr_node.model.adaptation import cross_validate_class, fit_site_head

    check_counts(y, min_per_class, "adapt")
    folds = min(5, len(set(groups)))
    try:
        cv = cross_validate_class(features, y, p_model, threshold, groups, target, folds=folds, seed=seed,
                                  n_boot=n_boot)
    except ValueError as e:
        raise Refused(f"{e} (patients {len(set(groups))})") from None
    cv.pop("out_of_fold")
    lo = cv["paired_auc"]["ci95"][0]
    cv["gate"] = {"rule": "lower bound of the paired AUC difference (head - model p(abnormal)) above 0",
                  "lower_bound": lo, "passed": bool(lo == lo and lo > 0)}
    if not cv["gate"]["passed"]:
        return cv, None
    h = fit_site_head(features, y, groups, target, seed=seed)
    return cv, {"weight": [float(v) for v in h["weight"]], "bias": h["bias"], "threshold": h["threshold"],
                "l2": h["l2"], "platt": h["platt"]}


def head_probability(head: dict[str, Any], features: np.ndarray) -> float:
    z = float(np.dot(np.asarray(head["weight"], dtype=np.float64), np.asarray(features, dtype=np.float64).ravel())
              + float(head["bias"]))
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


# --------------------------------------------------------------------------- the pipeline


def apply(policy, model, calibration=None, head=None):
    """(policy, identity) with the station's abnormal operating point: its site head's when it has
    one on this axis, else its site calibration's, else the model's own (unchanged)."""
    if not getattr(policy, "has_abnormality", False):
        return policy, model
    t = threshold_of(calibration)
    h = (head.heads or {}).get(HEAD_KEY) if head is not None else None
    if h is not None:
        t = float(h["threshold"])
    if t is None:
        # a class-axis calibration or head (fitted before this model, or for its patterns) does not set the
        # urgent flag's operating point: the results say it is the model's ("not yet calibrated at this site")
        if model.calibration == "model":
            return policy, model
        return policy, dataclasses.replace(model, calibration="model", abnormal_threshold=policy.abnormal_threshold)
    return dataclasses.replace(policy, abnormal_threshold=t), dataclasses.replace(model, abnormal_threshold=t)
