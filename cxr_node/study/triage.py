"""The pipeline's triage stage: operating points -> each film's urgency, with the station's site
calibration (temperature, operating points) and its site heads (the critical classes' own
probabilities from the film's features) when it has them for these weights, else with the model's
own operating points. The policy is chosen once per study (:func:`study_policy`, in its first
round) and applied to its films as their rounds come (:func:`apply_policy`)."""

from __future__ import annotations

import dataclasses
import logging

from cxr_node.db.session import Database
from cxr_node.onboarding import stations
from cxr_node.study.work import Film, StudyWork

log = logging.getLogger(__name__)


def context(db: Database) -> tuple[dict, dict]:
    """The active site calibrations and site heads, by station."""
    from cxr_node.onboarding import site_adaptation

    return stations.active_calibrations(db), site_adaptation.active_heads(db)


def study_policy(predictor, identity, w: StudyWork, cals: dict, heads: dict, settings=None) -> tuple:
    """``(calibration, class heads, abnormal head, TriagePolicy, triggers, operating points)`` for study
    ``w``; sets ``w.calibration`` and ``w.model`` (the ModelIdentity its results carry). On a model with an
    abnormality output the station's operating point on p(abnormal) is its head's, else its calibration's,
    else the model's (:func:`cxr_node.onboarding.abnormal.apply`); ``[triage] triggers`` (or the station's)
    then decide which outputs may raise the flag (:mod:`cxr_node.model.triggers`)."""
    from cxr_node.model import triggers as trigger_rules
    from cxr_node.onboarding import abnormal, site_adaptation

    cal = cals.get(w.station.name) if w.station is not None else None
    if cal is not None and cal.weights_sha256 != predictor.weights_sha256:
        log.warning("station %s: site calibration v%d was fitted for other model weights; using the "
                    "model's operating points (run `cxr-node calibrate-site --station %s` again)",
                    w.station.name, cal.version, w.station.name)
        cal = None
    w.calibration = cal
    policy, model = predictor.policy, identity
    if cal is not None:
        policy = dataclasses.replace(policy, thresholds=dict(cal.thresholds))
        model = dataclasses.replace(model, thresholds=dict(cal.thresholds),
                                    calibration=stations.calibration_name(cal),
                                    temperature=cal.temperature)
    head = site_adaptation.heads_for(heads.get(w.station.name) if w.station is not None else None,
                                     predictor.weights_sha256)
    class_heads = {c: h for c, h in head.heads.items() if c != abnormal.HEAD_KEY} if head is not None else {}
    abnormal_head = head.heads.get(abnormal.HEAD_KEY) if head is not None and policy.has_abnormality else None
    if head is not None:  # the station's own heads decide their critical classes
        th = {**dict(policy.thresholds), **{c: float(h["threshold"]) for c, h in class_heads.items()}}
        policy = dataclasses.replace(policy, thresholds=th)
        model = dataclasses.replace(model, thresholds=th, calibration=site_adaptation.head_name(head))
    policy, model = abnormal.apply(policy, model, cal, head)
    triggers = station_triggers(settings, w) if settings is not None else ()
    w.model = dataclasses.replace(model, triggers=triggers, pattern_triggers=tuple(policy.pattern_triggers))
    ops = trigger_rules.operating_points(policy.thresholds, getattr(policy, "abnormal_threshold", None))
    return cal, class_heads, abnormal_head, policy, triggers, ops


def station_triggers(settings, w: StudyWork) -> tuple[str, ...]:
    """The station's ``triggers`` when its [[stations]] entry has them, else ``[triage] triggers``."""
    entry = stations.configured(settings, w.station.name) if w.station is not None else None
    if entry is not None and entry.triggers is not None:
        return tuple(entry.triggers)
    return tuple(settings.triage.triggers)


def apply_policy(predictor, films: list[Film], cal, class_heads, abnormal_head, policy, triggers, ops) -> None:
    """Each analysed film's prediction -> its Finding (urgency), under the study's policy."""
    import numpy as np

    from cxr_node.model import triggers as trigger_rules
    from cxr_node.model.adaptation import apply_site_heads
    from cxr_node.model.calibration import logits_from, softmax
    from cxr_node.onboarding import abnormal

    for film in films:
        if film.refused is None and film.prediction is not None:
            p = film.prediction
            if cal is not None:  # the same logits, the site's temperature
                q = softmax(logits_from([p.probabilities], predictor.temperature), cal.temperature)[0]
                k = int(np.argmax(q))
                p = dataclasses.replace(p, probabilities=tuple(float(x) for x in q),
                                        top_label=p.labels[k], top_probability=float(q[k]))
            if class_heads and film.features is not None:
                q = apply_site_heads(p.probabilities, list(p.labels), film.features, class_heads)
                k = int(np.argmax(q))
                p = dataclasses.replace(p, probabilities=q, top_label=p.labels[k], top_probability=q[k])
            if abnormal_head is not None and film.features is not None and p.abnormal is not None:
                p = dataclasses.replace(p, abnormal=abnormal.head_probability(abnormal_head, film.features))
            film.prediction = trigger_rules.apply(policy.apply(p), triggers, ops)
