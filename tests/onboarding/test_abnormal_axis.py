"""Site onboarding on the abnormal axis (a model with an abnormality output, v5): Normal / Abnormal
labels, the station's operating point on p(abnormal) (calibrate-site), a site head for p(abnormal)
with its champion/challenger gate (adapt-site), and how the pipeline applies them. Pure logic and
a real migrated database; the daemon end to end is in test_abnormal_e2e.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from helpers_model import LABELS


@dataclass
class _Film:
    label: str
    abnormal: float | None
    calibration: str = "model"
    image_result_id: int = 0
    probabilities: dict | None = None


def test_labels_on_the_abnormal_axis():
    from cxr_node.onboarding import feedback

    assert feedback.canonical_label("abnormal", LABELS) == "Abnormal"
    assert feedback.canonical_label("NORMAL", ["COVID", "No Finding"]) == "No Finding"
    assert feedback.choices(LABELS) == ["COVID", "Normal", "Viral Pneumonia", "Abnormal", "Other"]
    assert [feedback.is_abnormal(x) for x in ("Normal", "No Finding", "Abnormal", "COVID", "Viral Pneumonia",
                                              "Other", "")] == [False, False, True, True, True, True, None]


def _films(n_abn: int, n_norm: int, gap: float = 0.3, seed: int = 0, **kw) -> list[_Film]:
    rng = np.random.default_rng(seed)
    pos = np.clip(rng.normal(0.5 + gap / 2, 0.12, n_abn), 0.01, 0.99)
    neg = np.clip(rng.normal(0.5 - gap / 2, 0.12, n_norm), 0.01, 0.99)
    labels = ["Abnormal" if i % 3 else "COVID" for i in range(n_abn)]  # a pattern label counts as abnormal
    return ([_Film(lab, float(p), image_result_id=i, **kw) for i, (lab, p) in enumerate(zip(labels, pos))]
            + [_Film("Normal", float(p), image_result_id=1000 + i, **kw) for i, p in enumerate(neg)])


def test_operating_point_meets_the_target_and_refuses_what_labels_cannot_support():
    from cxr_node.onboarding import abnormal

    films = _films(60, 80) + [_Film("Normal", None), _Film("Abnormal", 0.99, calibration="site st1 head v1")]
    res = abnormal.calibrate(films, target=0.9, min_per_class=50, before_threshold=0.95, before_name="model")
    assert res["counts"] == {"abnormal": 60, "normal": 80} and res["films"] == 140
    assert res["skipped"] == {"no p(abnormal)": 1, "scored by a site head": 1}
    sens = res["after"]["sensitivity"]
    assert sens["value"] >= 0.9 and sens["k"] == 54 and sens["ci95"][0] < 0.9  # Wilson interval reported
    assert res["before"]["sensitivity"]["value"] < 0.2 and res["before"]["calibration"] == "model"
    # the highest such threshold: one step up loses the target
    pos = sorted((f.abnormal for f in films[:60]), reverse=True)
    assert res["threshold"] == pos[53] and not res["problems"]
    assert res["after"]["specificity"]["value"] > 0.6
    with pytest.raises(abnormal.Refused, match="abnormal 60, normal 80 .at least 61 of each"):
        abnormal.calibrate(films, target=0.9, min_per_class=61, before_threshold=0.5, before_name="model")
    # a handful of noise: the bootstrap says the labels cannot carry a threshold
    noisy = _films(8, 8, gap=0.0, seed=4)
    noisy = [dataclass_replace(f, abnormal=float(v)) for f, v in
             zip(noisy, np.random.default_rng(1).uniform(0.02, 0.98, 16))]
    res = abnormal.calibrate(noisy, target=0.5, min_per_class=5, before_threshold=0.5, before_name="model")
    assert res["problems"] and "bootstrap 95% interval" in res["problems"][0]


def dataclass_replace(f, **kw):
    import dataclasses

    return dataclasses.replace(f, **kw)


def test_the_station_operating_point_reaches_the_policy_and_identity():
    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.model.policy import TriagePolicy
    from cxr_node.onboarding import abnormal

    @dataclass
    class Row:
        report: dict | None = None
        heads: dict | None = None

    v5 = TriagePolicy(tuple(LABELS), {"COVID": 0.5}, (), "Normal", abnormal_threshold=0.6)
    ident = ModelIdentity("m", "v5", "densenet121", "a" * 64, tuple(LABELS), abnormal_threshold=0.6)
    cal = Row(report={"abnormal": {"threshold": 0.31}})
    p, m = abnormal.apply(v5, ident, cal, None)
    assert p.abnormal_threshold == m.abnormal_threshold == 0.31
    assert p.decide([0.2, 0.5, 0.3], abnormal=0.4).urgent and not v5.decide([0.2, 0.5, 0.3], abnormal=0.4).urgent
    head = Row(heads={abnormal.HEAD_KEY: {"threshold": 0.7, "weight": [1.0, 0.0], "bias": 0.0}})
    p, m = abnormal.apply(v5, ident, cal, head)  # the station's head decides over its calibration
    assert p.abnormal_threshold == m.abnormal_threshold == 0.7
    assert abnormal.head_probability(head.heads["Abnormal"], np.array([2.0, 5.0])) == pytest.approx(1 / (1 + np.exp(-2)))
    p, m = abnormal.apply(v5, ident, Row(report={"thresholds": {}}), None)  # a class-axis calibration
    assert p is v5 and m is ident
    v2 = TriagePolicy(tuple(LABELS), {"COVID": 0.5}, ("COVID",), "Normal")
    assert abnormal.apply(v2, ident, cal, head) == (v2, ident)  # no abnormality output: unchanged


def _site(n: int = 120, informative: bool = True, seed: int = 0, d: int = 16):
    rng = np.random.default_rng(seed)
    labels = ["Normal" if i % 2 else ("Tuberculosis" if i % 4 else "Abnormal") for i in range(n)]
    y = np.array([lab != "Normal" for lab in labels])
    x = rng.normal(0, 1, (n, d))
    if informative:
        x[:, 0] += 2.0 * y
    films = [_Film(lab, float(rng.uniform(0.3, 0.7))) for lab in labels]  # the model: at chance here
    return films, x, [f"P{i // 2}" for i in range(n)]


def _adapt(films, x, groups, minimum=30):
    from cxr_node.onboarding.site_adaptation import fit_abnormal

    return fit_abnormal(films, x, groups, station="st1", threshold=0.5, model_version="m5", weights_sha256="b" * 64,
                        target_sensitivity=0.9, min_per_class=minimum, n_boot=200)


def test_site_head_on_the_abnormal_axis_and_its_gate():
    from cxr_node.onboarding.site_adaptation import AdaptationRefused

    films, x, groups = _site()
    res = _adapt(films, x, groups)
    assert (res["abnormal"], res["normal"], res["axis"]) == (60, 60, "abnormal")
    c = res["classes"]["Abnormal"]
    assert c["paired_auc"]["auc_after"] > c["paired_auc"]["auc_before"] + 0.2 and c["gate"]["passed"]
    assert res["accepted"] and set(res["heads"]) == {"Abnormal"} and len(res["heads"]["Abnormal"]["weight"]) == 16
    films, x, groups = _site(informative=False, seed=2)
    res = _adapt(films, x, groups)
    assert not res["classes"]["Abnormal"]["gate"]["passed"] and not res["accepted"] and res["heads"] == {}
    with pytest.raises(AdaptationRefused, match="abnormal 60, normal 60 .at least 61 of each"):
        _adapt(films, x, groups, minimum=61)


def test_calibrate_site_on_a_v5_model_stores_the_operating_point(tmp_path):
    """A real migrated database: a v5 ModelInfo calibrates p(abnormal), keeps temperature and
    pattern thresholds, stores it versioned with the operating point in the report and the audit row;
    a v2 ModelInfo on the same films leaves the 'Abnormal' labels out of its class fit."""
    import io
    import json

    from cxr_node import config
    from cxr_node.db import migrate
    from cxr_node.db.models import AuditEvent, ImageResult, Study, utcnow
    from cxr_node.db.session import Database
    from cxr_node.onboarding import abnormal, feedback, performance
    from cxr_node.onboarding import site_calibration as sc

    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    rng = np.random.default_rng(5)
    truth, urg = {}, {}
    with db.transaction() as s:
        now = utcnow()
        for i in range(140):
            uid_ = f"1.2.5.{i}"
            bad = i % 2 == 0
            s.add(Study(study_uid=uid_, state="processed", version=1, patient_id=f"P{i}", first_received_at=now,
                        last_received_at=now, state_changed_at=now))
            pa = float(np.clip(rng.normal(0.55 if bad else 0.35, 0.1), 0.01, 0.99))
            urg[uid_] = pa >= 0.6
            s.add(ImageResult(study_uid=uid_, study_version=1, sop_instance_uid=f"{uid_}.1", analysed=True,
                              model_version="m5", top_label="Normal", urgent=urg[uid_], priority="routine",
                              probabilities={"COVID": 0.2, "Normal": 0.6, "Viral Pneumonia": 0.2}, created_at=now,
                              station="st1", calibration="model", temperature=1.0, abnormal=pa,
                              image_stats={"rows": 128, "cols": 128, "mean": 0.5, "std": 0.2}))
            truth[uid_] = ("Abnormal" if i % 4 else "Viral Pneumonia") if bad else "Normal"
    for u, lab in truth.items():
        feedback.add_label(db, u, lab, "dr.a", labels=LABELS)
    with db.session() as s:
        perf = performance.compute(performance.labelled_films(s, station="st1"), LABELS, [], n_boot=50)
    ab = perf["abnormal_axis"]
    assert perf["films"] == 105 and perf["abnormal_only"] == 35  # 'Abnormal' names no class: abnormal axis only
    buf = io.StringIO()
    performance.write_table(perf, buf)
    assert "abnormal axis (70 abnormal, 70 normal; every label but Normal is abnormal): p(abnormal) AUC" in buf.getvalue()
    assert (ab["abnormal"], ab["normal"]) == (70, 70) and ab["auc"]["value"] > 0.8
    assert ab["urgent_recall"]["k"] == sum(urg[u] for u, lab in truth.items() if lab != "Normal")
    assert ab["urgent_specificity"]["k"] == sum(not urg[u] for u, lab in truth.items() if lab == "Normal")
    th = {"COVID": 0.5, "Normal": 0.5, "Viral Pneumonia": 0.5}
    v5 = sc.ModelInfo(tuple(LABELS), ("COVID",), "m5", "b" * 64, 1.3, th, abnormal_threshold=0.8)
    with db.session() as s:
        res = sc.fit(s, "st1", v5, target_sensitivity=0.9, min_per_class=50)
    assert res["counts"] == {"abnormal": 70, "normal": 70} and res["temperature"] == 1.3 and res["thresholds"] == th
    t = res["abnormal"]["threshold"]
    assert 0.3 < t < 0.55 and res["after"]["sensitivity"]["value"] >= 0.9 > res["before"]["sensitivity"]["value"]
    row = sc.store(db, res)
    assert abnormal.threshold_of(row) == pytest.approx(t)
    with db.session() as s:
        (ev,) = s.query(AuditEvent).filter(AuditEvent.event == "calibration.site").all()
        detail = ev.detail if isinstance(ev.detail, dict) else json.loads(ev.detail)
        assert detail["abnormal_threshold"] == pytest.approx(t)
        with pytest.raises(sc.CalibrationRefused, match="abnormal 70, normal 70 .at least 71"):
            sc.fit(s, "st1", v5, target_sensitivity=0.9, min_per_class=71)
        # on a v2 model the same films give a class fit: the 35 'Abnormal' films name no class and are left out
        v2 = sc.ModelInfo(tuple(LABELS), ("COVID",), "m5", "b" * 64, 1.0, th)
        with pytest.raises(sc.CalibrationRefused, match=r"COVID 0 .*have COVID 0, Normal 70, Viral Pneumonia 35"):
            sc.fit(s, "st1", v2, target_sensitivity=0.9, min_per_class=10)


def test_a_class_only_calibration_on_a_v5_model_leaves_the_operating_point_the_models():
    """A site calibration without an abnormal operating point (class thresholds only) must not make the
    results call the model's p(abnormal) operating point the site's."""
    import types

    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.model.policy import TriagePolicy
    from cxr_node.onboarding import abnormal

    pol = TriagePolicy(labels=("COVID", "Normal"), thresholds={"COVID": 0.3}, normal_label="Normal",
                       abnormal_threshold=0.4)
    ident = ModelIdentity("m", "v5", "densenet121", "0" * 64, ("COVID", "Normal"), calibration="site A v2",
                          abnormal_threshold=0.4)
    cal = types.SimpleNamespace(report={}, thresholds={"COVID": 0.5})
    p2, m2 = abnormal.apply(pol, ident, cal, None)
    assert p2.abnormal_threshold == 0.4 and m2.calibration == "model" and m2.abnormal_threshold == 0.4
