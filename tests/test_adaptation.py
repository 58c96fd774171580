"""Site adaptation (cxr-node adapt-site): logistic heads on frozen features, the patient-grouped
before/after estimate, the refusal below the minimum, the champion/challenger gate, versioned
storage bound to the weights, rollback, and the heads applied to a film's probabilities. Generated
features; a real migrated database."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from helpers_model import LABELS


@dataclass
class _Film:
    label: str
    probabilities: dict


def _site(n: int = 160, informative: bool = True, seed: int = 0, d: int = 24):
    """Films of a site where the model ranks COVID at chance but the features know it (or not)."""
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % 3] if i % 4 else "Other" for i in range(n)]
    y = np.array([lab == "COVID" for lab in labels])
    x = rng.normal(0, 1, (n, d))
    if informative:
        x[:, 0] += 2.0 * y
        x[:, 1] -= 1.0 * y
    films = []
    for lab in labels:
        p = rng.dirichlet([1, 1, 1])  # the model: no idea
        films.append(_Film(lab, dict(zip(LABELS, map(float, p)))))
    groups = [f"P{i // 2}" for i in range(n)]  # two films per patient
    return films, x, groups


def _fit(films, x, groups, minimum=20, **kw):
    from cxr_node.site_adaptation import fit

    return fit(films, x, groups, station="st1", labels=LABELS, critical=["COVID"],
               thresholds={"COVID": 0.5, "Normal": 0.5, "Viral Pneumonia": 0.5}, model_version="m1",
               weights_sha256=kw.pop("sha", "a" * 64), target_sensitivity=0.9, min_per_class=minimum, n_boot=200, **kw)


def test_logistic_head_folds_into_a_linear_layer_and_heads_replace_critical_probabilities():
    from cxr_node.adaptation import LogisticHead, apply_site_heads, fit_logistic_head

    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, (200, 6))
    y = (x[:, 0] + 0.5 * x[:, 2] > 4).astype(int)
    h = fit_logistic_head(x, y, ["a", "b"], l2=1.0)
    W, b = h.as_linear()
    assert np.allclose(x @ W.T + b, h.logits(x))
    assert ((h.logits(x)[:, 1] > h.logits(x)[:, 0]) == y.astype(bool)).mean() > 0.95
    assert np.allclose(LogisticHead.from_json(h.to_json()).logits(x), h.logits(x))
    heads = {"COVID": {"weight": [1.0, 0, 0, 0, 0, 0], "bias": 0.0, "threshold": 0.5}}
    f = np.array([2.0, 0, 0, 0, 0, 0])
    q = apply_site_heads([0.1, 0.6, 0.3], LABELS, f, heads)
    assert q[0] == pytest.approx(1 / (1 + np.exp(-2.0))) and sum(q) == pytest.approx(1.0)
    assert q[1] / q[2] == pytest.approx(2.0)  # the others keep their proportions
    two = {**heads, "Normal": {"weight": [1.0, 0, 0, 0, 0, 0], "bias": 5.0, "threshold": 0.5}}
    q = apply_site_heads([0.1, 0.6, 0.3], LABELS, f, two)  # heads summing above 1 are scaled to 1
    assert sum(q) == pytest.approx(1.0) and q[2] == 0.0


def test_refused_below_the_minimum_and_the_gate_keeps_the_champion():
    from cxr_node.site_adaptation import AdaptationRefused

    films, x, groups = _site()
    n_covid = sum(f.label == "COVID" for f in films)
    with pytest.raises(AdaptationRefused, match=f"too few labelled films to adapt: COVID {n_covid} vs not COVID"):
        _fit(films, x, groups, minimum=n_covid + 1)
    res = _fit(films, x, groups)
    c = res["classes"]["COVID"]
    a = c["paired_auc"]
    assert a["auc_after"] > a["auc_before"] + 0.2 and a["ci95"][0] > 0  # informative features: the head wins
    assert c["gate"]["passed"] and res["accepted"] and set(res["heads"]) == {"COVID"}
    assert len(res["heads"]["COVID"]["weight"]) == x.shape[1]
    assert c["after_at_target"]["sensitivity"] >= 0.7
    # features that know nothing: the challenger loses, nothing may be stored
    films2, x2, groups2 = _site(informative=False, seed=5)
    res2 = _fit(films2, x2, groups2)
    assert not res2["classes"]["COVID"]["gate"]["passed"] and not res2["accepted"] and res2["heads"] == {}


def test_stored_versions_bound_to_the_weights_audited_and_rolled_back(tmp_path):
    from sqlalchemy import select

    from cxr_node import config, site_adaptation as sa
    from cxr_node.db import migrate
    from cxr_node.db.models import AuditEvent
    from cxr_node.db.session import Database

    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    films, x, groups = _site()
    res = _fit(films, x, groups)
    bad = _fit(*_site(informative=False, seed=5))
    with pytest.raises(sa.AdaptationRefused, match="no site head beat the model"):
        sa.store(db, bad)
    v1 = sa.store(db, res)
    v2 = sa.store(db, res)
    assert (v1.version, v2.version) == (1, 2) and sa.head_name(v2) == "site st1 head v2"
    heads = sa.active_heads(db)
    assert heads["st1"].version == 2 and heads["st1"].heads["COVID"]["threshold"] == res["heads"]["COVID"]["threshold"]
    assert sa.heads_for(heads["st1"], "a" * 64) is heads["st1"]
    assert sa.heads_for(heads["st1"], "b" * 64) is None  # other weights: the head is not used
    cur, prev = sa.rollback(db, "st1")
    assert (cur.version, prev.version) == (2, 1) and sa.active_heads(db)["st1"].version == 1
    # a version for other weights is never restored by a rollback
    other = sa.store(db, dict(res, weights_sha256="b" * 64))
    cur, prev = sa.rollback(db, "st1")
    assert cur.version == other.version and prev is None and "st1" not in sa.active_heads(db)
    with pytest.raises(sa.AdaptationRefused, match="nothing to roll back"):
        sa.rollback(db, "st1")
    with db.session() as s:
        ev = list(s.scalars(select(AuditEvent).where(AuditEvent.event.like("adaptation.%")).order_by(AuditEvent.id)))
    assert [e.event for e in ev] == ["adaptation.site"] * 2 + ["adaptation.rollback", "adaptation.site",
                                                              "adaptation.rollback"]
    assert ev[0].detail["weights_sha256"] == "a" * 64 and ev[0].detail["classes"] == ["COVID"]
    assert ev[0].detail["auc"]["COVID"]["ci95"][0] > 0
