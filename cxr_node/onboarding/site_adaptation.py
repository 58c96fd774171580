"""Site adaptation (``cxr-node adapt-site``): the step after ``calibrate-site``, on the same labelled films.

Calibration moves thresholds; it cannot fix ranking. A station's own labels can: for each critical
class, a logistic head on the model's frozen penultimate features (:mod:`cxr_node.model.adaptation`),
with its calibration (a Platt scale from out-of-fold scores) folded into its weights.

* **Before and after** by patient-grouped cross-validation on the labelled films: AUC of the class
  (model as is against the head, out of fold) with the paired patient-bootstrap 95% interval of the
  difference; sensitivity and specificity at the model's threshold and at the target.
* **Refused** below ``min_per_class`` films of the class and of the rest (:class:`AdaptationRefused`).
* **Champion and challenger**: a class's head is kept only if the lower bound of the paired AUC
  difference is above zero; when no class passes, nothing is stored (the figures are printed either way).
* **Stored** versioned (``site_heads``, migration 0009), bound to the weights' sha256 (other weights
  ignore it), audited as ``adaptation.site``; :func:`rollback` retires the active version and restores
  the previous one for the same weights (audited as ``adaptation.rollback``).
* On a model with an abnormality output (v5) the head is one, for p(abnormal) (:func:`fit_abnormal`,
  :mod:`cxr_node.onboarding.abnormal`): readers' Normal / Abnormal labels are enough.
* The pipeline triages the station's films with it (:func:`heads_for`, :func:`head_name` names it in
  the SR's algorithm parameters and the SC legend, as a site calibration is named).

The films' features are recomputed from the spool (films that retention removed are skipped and
counted), through the same preprocessing and weights the daemon uses.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from sqlalchemy import func, select

from cxr_node.audit import trail as audit
from cxr_node.db.models import Instance, SiteHead, utcnow
from cxr_node.errors import CxrNodeError
from cxr_node.model.calibration import json_safe
from cxr_node.onboarding import versions

log = logging.getLogger(__name__)


class AdaptationRefused(CxrNodeError):
    """Too few labelled films, no head beat the model, or nothing to roll back; the message says why."""


def head_name(row: SiteHead | None) -> str:
    return "model" if row is None else f"site {row.station} head v{row.version}"


def active(session, station: str) -> SiteHead | None:
    return versions.active(session, SiteHead, station)


def active_heads(db) -> dict[str, SiteHead]:
    """station -> its active site heads (any weights; :func:`heads_for` checks the binding)."""
    with db.session() as s:
        rows = list(s.scalars(select(SiteHead).where(SiteHead.active.is_(True))))
        for r in rows:
            s.expunge(r)
    return {r.station: r for r in rows}


def heads_for(row: SiteHead | None, weights_sha256: str) -> SiteHead | None:
    """``row`` when it was fitted for these weights, else None (with a warning)."""
    if row is not None and row.weights_sha256 != weights_sha256:
        log.warning("station %s: site head v%d was fitted for other model weights; not used (run `cxr-node "
                    "adapt-site --station %s` again)", row.station, row.version, row.station)
        return None
    return row


# --------------------------------------------------------------------------- features


def labelled_with_features(settings, session, station: str, predictor, segmenter=None
                           ) -> tuple[list, np.ndarray, list[str], dict[str, int]]:
    """The station's labelled films analysed by these weights, their features (from the spooled
    files), their patient groups, and how many were skipped and why."""
    from pydicom import dcmread

    from cxr_node.errors import PreprocessError
    from cxr_node.model.preprocess import prepare
    from cxr_node.onboarding.performance import labelled_films

    films = labelled_films(session, station=station, model_version=predictor.version)
    inst = {i.sop_instance_uid: i for i in session.scalars(
        select(Instance).where(Instance.sop_instance_uid.in_([f.sop_instance_uid for f in films])))}
    kept, xs, groups = [], [], []
    skipped = {"file removed": 0, "unusable": 0}
    for f in films:
        i = inst.get(f.sop_instance_uid)
        path = settings.storage.spool_dir / i.path if i is not None else None
        if i is None or i.removed_at is not None or not path.is_file():
            skipped["file removed"] += 1
            continue
        try:
            pr = prepare(dcmread(path), predictor.params, segmenter)
        except PreprocessError:
            skipped["unusable"] += 1
            continue
        kept.append(f)
        xs.append(pr.x)
        groups.append(i.patient_id or f.study_uid)
    if xs and getattr(predictor, "abnormality", None) is not None:
        # the model's own p(abnormal), recomputed (the champion; a head active then may have scored them)
        feats = []
        for s in range(0, len(xs), 32):
            preds = predictor.predict(xs[s:s + 32], explain=False)
            feats.append(predictor.last_features if predictor.last_features is not None
                         else predictor.features(xs[s:s + 32]))
            for f, p in zip(kept[s:s + 32], preds):
                f.abnormal = p.abnormal
        return kept, np.concatenate(feats), groups, skipped
    feats = predictor.features(xs) if xs else np.zeros((0, 0))
    return kept, feats, groups, skipped


# --------------------------------------------------------------------------- fit, gate


def fit(films: Sequence, features: np.ndarray, groups: Sequence[str], *, station: str, labels: Sequence[str],
        critical: Sequence[str], thresholds: dict[str, float], model_version: str, weights_sha256: str,
        target_sensitivity: float, min_per_class: int, n_boot: int = 1000, seed: int = 0,
        skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """Before/after by grouped cross-validation, the gate, and the heads of the classes that pass.
    Raises AdaptationRefused below ``min_per_class``; the result's ``accepted`` says whether any head
    beat the model (only then may it be stored)."""
    from cxr_node.model.adaptation import cross_validate_class, fit_site_head
    from cxr_node.onboarding.feedback import ABNORMAL

    keep = [i for i, f in enumerate(films) if f.label != ABNORMAL]  # "Abnormal" names no class
    if len(keep) < len(films):
        films, features, groups = [films[i] for i in keep], features[keep], [groups[i] for i in keep]
    names = [f.label for f in films]
    counts = {n: names.count(n) for n in sorted(set(names))}
    short = []
    for c in critical:
        pos = names.count(c)
        if pos < min_per_class or len(names) - pos < min_per_class:
            short.append(f"{c} {pos} vs not {c} {len(names) - pos}")
    usable = [c for c in critical if names.count(c) >= min_per_class and len(names) - names.count(c) >= min_per_class]
    if not usable:
        raise AdaptationRefused(
            f"station {station}: too few labelled films to adapt: {', '.join(short)} (at least {min_per_class} "
            f"films of a critical class and {min_per_class} others needed; have "
            f"{', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'}"
            + (f"; skipped {', '.join(f'{k} {v}' for k, v in skipped.items() if v)}" if skipped and any(skipped.values())
               else "") + "). Import more feedback (cxr-node feedback import) or lower --min-per-class")
    p_model = np.array([[float(f.probabilities.get(n, 0.0)) for n in labels] for f in films])
    classes: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    for c in usable:
        y = np.array([n == c for n in names])
        cv = cross_validate_class(features, y, p_model[:, labels.index(c)], thresholds[c], groups,
                                  target_sensitivity, folds=min(5, len(set(groups))), seed=seed, n_boot=n_boot)
        cv.pop("out_of_fold")
        lo = cv["paired_auc"]["ci95"][0]
        cv["gate"] = {"rule": "lower bound of the paired AUC difference (head - model) above 0",
                      "lower_bound": lo, "passed": bool(lo == lo and lo > 0)}
        classes[c] = cv
        if cv["gate"]["passed"]:
            h = fit_site_head(features, y, groups, target_sensitivity, seed=seed)
            heads[c] = {"weight": [float(v) for v in h["weight"]], "bias": h["bias"], "threshold": h["threshold"],
                        "l2": h["l2"], "platt": h["platt"]}
    return {"station": station, "model_version": model_version, "weights_sha256": weights_sha256,
            "films": len(films), "counts": counts, "skipped": skipped or {}, "patients": len(set(groups)),
            "target_sensitivity": target_sensitivity, "min_per_class": min_per_class, "classes": classes,
            "not_fitted": short, "heads": heads, "accepted": bool(heads)}


def fit_abnormal(films: Sequence, features: np.ndarray, groups: Sequence[str], *, station: str, threshold: float,
                 model_version: str, weights_sha256: str, target_sensitivity: float, min_per_class: int,
                 n_boot: int = 1000, seed: int = 0, skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """:func:`fit` on the abnormal axis (a model with an abnormality output): one head for
    p(abnormal) (:func:`cxr_node.onboarding.abnormal.adapt`), stored under ``Abnormal``; the
    champion is the model's own p(abnormal) at ``threshold`` (the operating point in force)."""
    from cxr_node.onboarding import abnormal
    from cxr_node.onboarding.feedback import is_abnormal

    keep = [i for i, f in enumerate(films) if is_abnormal(f.label) is not None and f.abnormal is not None]
    films = [films[i] for i in keep]
    x, g = features[keep] if len(keep) else features[:0], [groups[i] for i in keep]
    y = np.array([bool(is_abnormal(f.label)) for f in films], dtype=bool)
    names = [f.label for f in films]
    counts = {n: names.count(n) for n in sorted(set(names))}
    try:
        cv, head = abnormal.adapt(x, y, np.array([float(f.abnormal) for f in films]), threshold, g,
                                  target=target_sensitivity, min_per_class=min_per_class, n_boot=n_boot, seed=seed)
    except abnormal.Refused as e:
        more = (f"; skipped {', '.join(f'{k} {v}' for k, v in skipped.items() if v)}"
                if skipped and any(skipped.values()) else "")
        raise AdaptationRefused(f"station {station}: {e}{more}. Import more feedback (cxr-node feedback import: "
                                "Normal / Abnormal is enough) or lower --min-per-class") from None
    heads = {abnormal.HEAD_KEY: head} if head is not None else {}
    return {"station": station, "model_version": model_version, "weights_sha256": weights_sha256,
            "films": len(films), "counts": counts, "axis": "abnormal", **{k: v for k, v in abnormal.counts(y).items()},
            "skipped": skipped or {}, "patients": len(set(g)), "target_sensitivity": target_sensitivity,
            "min_per_class": min_per_class, "classes": {abnormal.HEAD_KEY: cv}, "not_fitted": [], "heads": heads,
            "accepted": bool(heads)}


def with_reference(session, result: dict[str, Any], films: Sequence, features: np.ndarray,
                   labels: Sequence[str]) -> dict[str, Any]:
    """The drift reference for the station from now on: its labelled films with the probabilities
    the new heads give them (stored in the version's report; :func:`cxr_node.onboarding.stations.check_drift`)."""
    from cxr_node.db.models import ImageResult
    from cxr_node.model.adaptation import apply_site_heads
    from cxr_node.onboarding.drift import reference_from

    if not result.get("heads"):
        return result
    rows = list(session.scalars(select(ImageResult).where(ImageResult.id.in_([f.image_result_id for f in films]))))
    probs = {f.image_result_id: dict(zip(labels, apply_site_heads([f.probabilities.get(n, 0.0) for n in labels],
                                                                  list(labels), x, result["heads"])))
             for f, x in zip(films, features)}
    return dict(result, reference=reference_from(rows, labels, probs))


def report_of(result: dict[str, Any]) -> dict[str, Any]:
    return json_safe({k: v for k, v in result.items() if k != "heads"})


def store(db, result: dict[str, Any]) -> SiteHead:
    """Make the result's heads the station's active ones, as a new version. Refuses a result whose
    heads did not pass the gate."""
    if not result.get("accepted"):
        raise AdaptationRefused(f"station {result['station']}: no site head beat the model on the station's "
                                "held-out labels (lower bound of the paired AUC difference not above 0); nothing stored")
    station = result["station"]
    with db.transaction() as s:
        now = utcnow()
        previous = active(s, station)
        if previous is not None:
            previous.active, previous.retired_at = False, now
        version = (s.scalar(select(func.max(SiteHead.version)).where(SiteHead.station == station)) or 0) + 1
        row = SiteHead(station=station, version=version, weights_sha256=result["weights_sha256"],
                       model_version=result["model_version"], heads=result["heads"], report=report_of(result),
                       active=True, created_at=now)
        s.add(row)
        s.flush()
        audit.record(s, "adaptation.site", reason=f"station {station}: {head_name(row)} active"
                     + (f", replacing v{previous.version}" if previous is not None else ""),
                     detail={"station": station, "version": version, "id": row.id,
                             "replaces": previous.version if previous is not None else None,
                             "weights_sha256": row.weights_sha256, "classes": sorted(result["heads"]),
                             "thresholds": {c: h["threshold"] for c, h in result["heads"].items()},
                             "films": result["films"], "counts": result["counts"],
                             "auc": {c: v["paired_auc"] for c, v in report_of(result)["classes"].items()}})
        s.expunge(row)
    return row


def rollback(db, station: str) -> tuple[SiteHead, SiteHead | None]:
    """Retire the active heads; restore the newest earlier version for the same weights (or none)."""
    with db.transaction() as s:
        cur = active(s, station)
        if cur is None:
            raise AdaptationRefused(f"station {station}: no site head is active; nothing to roll back")
        prev = versions.retire_and_restore(s, SiteHead, cur)
        audit.record(s, "adaptation.rollback", reason=f"station {station}: head v{cur.version} retired; now "
                     f"{head_name(prev)}", detail={"station": station, "retired": cur.version,
                                                   "restored": prev.version if prev is not None else None})
        s.expunge(cur)
        if prev is not None:
            s.expunge(prev)
    return cur, prev
