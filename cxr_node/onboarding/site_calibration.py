"""Site recalibration (``cxr-node calibrate-site``): a station's own temperature and operating points,
fitted on its labelled films by the code that calibrated the model (:func:`cxr_node.model.calibration.
fit_operating_points`).

The logits are recovered from what was stored: each film's probabilities were ``softmax(logits /
T)`` with the temperature recorded beside them, so ``T * log(p)`` is the logits up to a constant,
which softmax ignores. Only films analysed by the model whose weights are configured now are used,
and the calibration is bound to those weights' sha256: a new model ignores it (the daemon says so)
until the station is calibrated again.

On a model with an abnormality output (v5) it calibrates the urgent flag's operating point on
p(abnormal) instead (:mod:`cxr_node.onboarding.abnormal`; stored in the version's report under
``abnormal``), keeping the temperature and pattern thresholds in force. On a model without one,
films labelled only ``Abnormal`` name no class and are not used.

Stored versioned (``site_calibrations``), one active per station, audited as ``calibration.site``;
``rollback`` retires the active one and restores the previous version of the same weights (or
the model's own operating points when there is none), audited as ``calibration.rollback``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import func, select

from cxr_node.audit import trail as audit
from cxr_node.db.models import ImageResult, SiteCalibration, utcnow
from cxr_node.errors import CxrNodeError
from cxr_node.model.calibration import json_safe
from cxr_node.onboarding import abnormal, drift, stations, versions
from cxr_node.onboarding.feedback import ABNORMAL
from cxr_node.onboarding.performance import LabelledFilm, labelled_films


class CalibrationRefused(CxrNodeError):
    """Too few labelled films, or nothing to roll back; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What calibrate-site needs to know about the configured model (from its checkpoint metadata)."""
    labels: tuple[str, ...]
    critical: tuple[str, ...]
    version: str
    weights_sha256: str
    temperature: float
    thresholds: dict[str, float]
    #: the checkpoint's operating point on p(abnormal) (None: no abnormality output, a v2 model)
    abnormal_threshold: float | None = None

    @classmethod
    def from_checkpoint(cls, path) -> "ModelInfo":
        from cxr_node.model.checkpoint import read_checkpoint

        ck = read_checkpoint(path)
        m = ck["meta"]
        abn = m.get("abnormality")
        return cls(tuple(m["labels"]), tuple(m.get("critical_labels") or ()), str(m["version"]), str(ck["sha256"]),
                   float(m["temperature"]), {k: float(v) for k, v in m["thresholds"].items()},
                   float(abn["threshold"]) if abn else None)


def _arrays(films: Sequence[LabelledFilm], labels: Sequence[str], default_t: float):
    import numpy as np

    from cxr_node.model.calibration import logits_from

    y = np.array([labels.index(f.label) if f.label in labels else -1 for f in films], dtype=int)
    p = np.array([[float(f.probabilities.get(n, 0.0)) for n in labels] for f in films], dtype=np.float64)
    t = np.array([f.temperature if f.temperature else default_t for f in films], dtype=np.float64)
    return y, logits_from(p, t)


def operating_figures(y, probs, thresholds: dict[str, float], labels: Sequence[str],
                      critical: Sequence[str]) -> dict[str, Any]:
    """Per class at its threshold (one vs rest, p >= t) and for the urgent flag (any critical class
    at or above its threshold): sensitivity and specificity with Wilson 95% intervals; plus ECE."""
    import numpy as np

    from cxr_node.model.calibration import expected_calibration_error, rate

    out: dict[str, Any] = {"per_class": {}}
    for k, name in enumerate(labels):
        if name not in thresholds:
            continue
        pos, hit = y == k, probs[:, k] >= thresholds[name]
        out["per_class"][name] = {"threshold": thresholds[name],
                                  "sensitivity": rate(int((pos & hit).sum()), int(pos.sum())),
                                  "specificity": rate(int((~pos & ~hit).sum()), int((~pos).sum()))}
    crit = [labels.index(c) for c in critical if c in labels and c in thresholds]
    if crit:
        truth = np.isin(y, crit)
        flag = np.zeros(len(y), bool)
        for k in crit:
            flag |= probs[:, k] >= thresholds[labels[k]]
        out["urgent_flag"] = {"sensitivity": rate(int((truth & flag).sum()), int(truth.sum())),
                              "specificity": rate(int((~truth & ~flag).sum()), int((~truth).sum()))}
    known = y >= 0
    out["ece"] = expected_calibration_error(y[known], probs[known])[0] if known.any() else None
    return out


def fit(session, station: str, model: ModelInfo, *, target_sensitivity: float, min_per_class: int,
        current: SiteCalibration | None = None, store_anyway: bool = False) -> dict[str, Any]:
    """Fit a calibration for ``station`` on its labelled films (nothing stored). Raises
    CalibrationRefused below ``min_per_class`` labelled films of a critical class, or of films of no
    critical class. Another class with fewer films than that keeps the threshold in force."""
    from cxr_node.model.calibration import fit_operating_points, softmax

    films = labelled_films(session, station=station, model_version=model.version)
    if not films and session.scalar(select(ImageResult.id).where(ImageResult.station == station).limit(1)) is None:
        from cxr_node.db.models import StationRow

        known = ", ".join(session.scalars(select(StationRow.name).order_by(StationRow.name))) or "none yet"
        raise CalibrationRefused(f"station {station}: no film from it was analysed (known stations: {known}; "
                                 "--station takes a station's name or its AE title)")
    if model.abnormal_threshold is not None:
        return _fit_abnormal(session, station, model, films, target_sensitivity=target_sensitivity,
                             min_per_class=min_per_class, current=current, store_anyway=store_anyway)
    # films labelled only Abnormal name no class: they say nothing about any class here
    films = [f for f in films if f.label != ABNORMAL]
    labels = list(model.labels)
    counts = {n: sum(f.label == n for f in films) for n in labels + ["Other"]}
    critical = [c for c in model.critical if c in labels]
    negatives = sum(f.label not in critical for f in films)
    neg_name = "not " + "/".join(critical)
    short = [f"{n} {counts[n]}" for n in critical if counts[n] < min_per_class]
    if negatives < min_per_class:
        short.append(f"{neg_name} {negatives}")
    if short:
        raise CalibrationRefused(
            f"station {station}: too few labelled films to calibrate: {', '.join(short)} (at least {min_per_class} "
            f"films of each critical class and {min_per_class} {neg_name} films needed; have "
            f"{', '.join(f'{k} {v}' for k, v in counts.items())}). Import more feedback (cxr-node feedback import), "
            "or lower --min-per-class / [onboarding] min_per_class knowing the operating points will be less certain")
    y, logits = _arrays(films, labels, model.temperature)
    new = fit_operating_points(logits, y, labels, critical, target_sensitivity, "point")
    problems = implausible(new, y, logits, labels, critical, target_sensitivity,
                           fitted=[n for n in labels if n in critical or counts[n] >= min_per_class])
    if problems and not store_anyway:
        raise CalibrationRefused(
            f"station {station}: calibration refused, nothing stored: {'; '.join(problems)}. The station keeps "
            f"its {stations.calibration_name(current)} operating points. Label more of its films, of every "
            "class (cxr-node feedback import), and run calibrate-site again; `cxr-node performance --station "
            f"{station}` shows how the operating points in force do meanwhile")
    before_t = current.temperature if current is not None else model.temperature
    before_th = dict(current.thresholds) if current is not None else dict(model.thresholds)
    # a class with too few films of its own here keeps the operating point in force
    for name in labels:
        if name not in critical and counts[name] < min_per_class and name in before_th:
            new["thresholds"][name] = before_th[name]
            new["operating_points"][name] = {"threshold": before_th[name],
                                             "rule": f"kept: only {counts[name]} {name} film(s) here"}
        elif name not in critical and name not in new["thresholds"] and name in before_th:
            new["thresholds"][name] = before_th[name]
            new["operating_points"][name] = {"threshold": before_th[name], "rule": "kept: no films to fit on"}
    before = operating_figures(y, softmax(logits, before_t), before_th, labels, model.critical)
    after = operating_figures(y, softmax(logits, new["temperature"]), new["thresholds"], labels, model.critical)
    before.update(temperature=before_t, calibration=stations.calibration_name(current))
    after.update(temperature=new["temperature"])
    missing = [c for c in model.critical if c not in new["thresholds"]]
    if missing:
        raise CalibrationRefused(f"station {station}: no operating point for {', '.join(missing)} (its labelled "
                                 "films are all of that class or none is)")
    # the films fitted on, as the drift reference for this station from now on
    # (their probabilities as this calibration gives them: what the station's films will be compared with)
    rows = list(session.scalars(select(ImageResult).where(ImageResult.id.in_([f.image_result_id for f in films]))))
    p_new = softmax(logits, new["temperature"])
    site_probs = {f.image_result_id: dict(zip(labels, map(float, p_new[i]))) for i, f in enumerate(films)}
    reference = drift.reference_from(rows, labels, site_probs)
    return {"station": station, "model_version": model.version, "weights_sha256": model.weights_sha256,
            "films": len(films), "counts": counts, "target_sensitivity": target_sensitivity,
            "min_per_class": min_per_class, "temperature": new["temperature"], "thresholds": new["thresholds"],
            "operating_points": new["operating_points"], "nll_before": new["nll_before"],
            "nll_after": new["nll_after"], "before": before, "after": after,
            "note": "before and after are measured on the same films the calibration was fitted on",
            "refusals_overridden": problems,
            "reference": reference}


def _fit_abnormal(session, station: str, model: ModelInfo, films: Sequence[LabelledFilm], *,
                  target_sensitivity: float, min_per_class: int, current: SiteCalibration | None,
                  store_anyway: bool) -> dict[str, Any]:
    """A model with an abnormality output: the station's operating point on p(abnormal)
    (:func:`cxr_node.onboarding.abnormal.calibrate`); the temperature and pattern thresholds in force
    are kept."""
    before_t = abnormal.threshold_of(current)
    before_t = model.abnormal_threshold if before_t is None else before_t
    name = stations.calibration_name(current)
    try:
        res = abnormal.calibrate(films, target=target_sensitivity, min_per_class=min_per_class,
                                 before_threshold=before_t, before_name=name)
    except abnormal.Refused as e:
        raise CalibrationRefused(
            f"station {station}: {e}. Import more feedback (cxr-node feedback import: Normal / Abnormal is enough), "
            "or lower --min-per-class / [onboarding] min_per_class knowing the operating point will be less "
            "certain") from None
    problems = res.pop("problems")
    if problems and not store_anyway:
        raise CalibrationRefused(
            f"station {station}: calibration refused, nothing stored: {'; '.join(problems)}. The station keeps "
            f"its {name} operating point ({before_t:.4f}). Label more of its films, normal and abnormal (cxr-node "
            f"feedback import), and run calibrate-site again")
    ids = res.pop("image_result_ids")
    rows = list(session.scalars(select(ImageResult).where(ImageResult.id.in_(ids))))
    temperature = current.temperature if current is not None else model.temperature
    thresholds = dict(current.thresholds) if current is not None else dict(model.thresholds)
    return {"station": station, "model_version": model.version, "weights_sha256": model.weights_sha256,
            "films": res["films"], "counts": res["counts"], "target_sensitivity": target_sensitivity,
            "min_per_class": min_per_class, "temperature": temperature, "thresholds": thresholds,
            "abnormal": {"threshold": res["threshold"], "before_threshold": before_t, "rule": res["rule"],
                         "skipped": res["skipped"]},
            "operating_points": {"abnormal": {"threshold": res["threshold"], "rule": res["rule"]}},
            "before": res["before"], "after": res["after"],
            "note": "before and after are measured on the same films the operating point was fitted on; the "
                    "temperature and pattern thresholds in force are kept",
            "refusals_overridden": problems, "reference": drift.reference_from(rows, list(model.labels))}


#: ``calibration.fit_temperature`` searches log T in [-3, 3]; a fit within EDGE_LOG of either end
#: stopped at the bound, not at a minimum the films support.
TEMPERATURE_LOG_BOUND = 3.0
EDGE_LOG = 0.4
#: A fitted threshold this close to 0 or 1 flags every film or none.
THRESHOLD_EDGE = 0.001
#: Bootstrap: resamples, and the widest 95% intervals accepted (temperature: hi / lo; the critical
#: classes' thresholds: hi - lo).
N_BOOT = 200
MAX_TEMPERATURE_SPREAD = 4.0
MAX_THRESHOLD_SPREAD = 0.5


def implausible(new: dict[str, Any], y, logits, labels: Sequence[str], critical: Sequence[str],
                target_sensitivity: float, fitted: Sequence[str], seed: int = 0) -> list[str]:
    """Why a fit (from ``fit_operating_points``) must not be stored: a temperature at the edge of
    the search, a fitted threshold at 0 or 1, or 95% bootstrap intervals (films resampled, the fit
    repeated) so wide that the labels cannot support it. Empty when it may be stored."""
    import math

    import numpy as np

    from cxr_node.model.calibration import fit_operating_points

    out = []
    lt = math.log(new["temperature"])
    if abs(lt) > TEMPERATURE_LOG_BOUND - EDGE_LOG:
        out.append(f"the temperature {new['temperature']:.4f} sits at the edge of what the fit allows "
                   f"({math.exp(-TEMPERATURE_LOG_BOUND):.3f} to {math.exp(TEMPERATURE_LOG_BOUND):.1f}): the films "
                   "do not determine it")
    edges = [f"{n} {th:.4f}" for n, th in new["thresholds"].items()
             if n in fitted and (th <= THRESHOLD_EDGE or th >= 1 - THRESHOLD_EDGE)]
    if edges:
        out.append(f"threshold(s) at the edge of 0..1 ({', '.join(edges)}): such a threshold flags every film or "
                   "none")
    if out:
        return out
    rng = np.random.default_rng(seed)
    n = len(y)
    temps, ths = [], {c: [] for c in critical if c in new["thresholds"]}
    for _ in range(N_BOOT):
        idx = rng.integers(0, n, n)
        yb = y[idx]
        if any(not (yb == labels.index(c)).any() for c in ths):
            continue  # a resample without a film of a critical class fits no threshold for it
        b = fit_operating_points(logits[idx], yb, labels, critical, target_sensitivity, "point")
        temps.append(math.log(b["temperature"]))
        for c in ths:
            if c in b["thresholds"]:
                ths[c].append(b["thresholds"][c])
    if len(temps) < N_BOOT // 2:
        return [f"too few films of {', '.join(ths)} for a bootstrap interval"]
    lo, hi = np.percentile(temps, [2.5, 97.5])
    if math.exp(hi - lo) > MAX_TEMPERATURE_SPREAD:
        out.append(f"the temperature's bootstrap 95% interval is {math.exp(lo):.3f}-{math.exp(hi):.3f} (a factor "
                   f"{math.exp(hi - lo):.1f}; at most {MAX_TEMPERATURE_SPREAD:g} accepted): the labels cannot "
                   "support it")
    for c, v in ths.items():
        lo, hi = np.percentile(v, [2.5, 97.5])
        if hi - lo > MAX_THRESHOLD_SPREAD:
            out.append(f"the {c} threshold's bootstrap 95% interval is {lo:.3f}-{hi:.3f} (wider than "
                       f"{MAX_THRESHOLD_SPREAD:g}): the labels cannot support it")
    return out


def active(session, station: str) -> SiteCalibration | None:
    return versions.active(session, SiteCalibration, station)


def store(db, result: dict[str, Any]) -> SiteCalibration:
    """Make ``result`` (from :func:`fit`) the station's active calibration, as a new version."""
    station = result["station"]
    with db.transaction() as s:
        now = utcnow()
        previous = active(s, station)
        if previous is not None:
            previous.active, previous.retired_at = False, now
        version = (s.scalar(select(func.max(SiteCalibration.version)).where(SiteCalibration.station == station))
                   or 0) + 1
        report = {k: v for k, v in result.items() if k != "reference"}
        row = SiteCalibration(station=station, version=version, weights_sha256=result["weights_sha256"],
                              model_version=result["model_version"], temperature=result["temperature"],
                              thresholds=result["thresholds"], report=json_safe(report),
                              reference=result["reference"], active=True, created_at=now)
        s.add(row)
        s.flush()
        audit.record(s, "calibration.site", reason=f"station {station}: {stations.calibration_name(row)} active"
                     + (f", replacing v{previous.version}" if previous is not None else ""),
                     detail={"station": station, "version": version, "id": row.id,
                             "replaces": previous.version if previous is not None else None,
                             "weights_sha256": row.weights_sha256, "temperature": row.temperature,
                             "thresholds": row.thresholds,
                             "abnormal_threshold": (result.get("abnormal") or {}).get("threshold"),
                             "films": result["films"], "counts": result["counts"],
                             "target_sensitivity": result["target_sensitivity"],
                             "refusals_overridden": result.get("refusals_overridden") or [],
                             "before": json_safe(result["before"]), "after": json_safe(result["after"])})
        s.expunge(row)
    return row


def rollback(db, station: str) -> tuple[SiteCalibration, SiteCalibration | None]:
    """Retire the station's active calibration and restore the newest earlier version fitted for the
    same weights as the one retired (None: the model's own operating points again)."""
    with db.transaction() as s:
        cur = active(s, station)
        if cur is None:
            raise CalibrationRefused(f"station {station}: no site calibration is active; nothing to roll back")
        prev = versions.retire_and_restore(s, SiteCalibration, cur)
        audit.record(s, "calibration.rollback",
                     reason=f"station {station}: v{cur.version} retired; now {stations.calibration_name(prev)}",
                     detail={"station": station, "retired": cur.version,
                             "restored": prev.version if prev is not None else None})
        s.expunge(cur)
        if prev is not None:
            s.expunge(prev)
    return cur, prev
