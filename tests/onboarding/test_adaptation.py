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
    from cxr_node.onboarding.site_adaptation import fit

    return fit(films, x, groups, station="st1", labels=LABELS, critical=["COVID"],
               thresholds={"COVID": 0.5, "Normal": 0.5, "Viral Pneumonia": 0.5}, model_version="m1",
               weights_sha256=kw.pop("sha", "a" * 64), target_sensitivity=0.9, min_per_class=minimum, n_boot=200, **kw)


def test_logistic_head_folds_into_a_linear_layer_and_heads_replace_critical_probabilities():
    from cxr_node.model.adaptation import LogisticHead, apply_site_heads, fit_logistic_head

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
    from cxr_node.onboarding.site_adaptation import AdaptationRefused

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

    from cxr_node import config
    from cxr_node.db import migrate
    from cxr_node.db.models import AuditEvent
    from cxr_node.db.session import Database
    from cxr_node.onboarding import site_adaptation as sa

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


def _blobbed(path, seed: int):
    """A generated chest film with bright blobs in the lower fields (the 'disease' a site head can
    learn from the features of a random network that ranks it at chance)."""
    from pydicom import dcmread

    ds = dcmread(path)
    a = ds.pixel_array.astype(np.int32)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]] / a.shape[0]
    for _ in range(5):
        cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.55, 0.8)
        a += (1500 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.003)).astype(np.int32)
    ds.PixelData = np.clip(a, 0, 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_adapt_site_end_to_end_through_the_daemon_to_orthanc(node_factory, orthanc_factory, tmp_path):
    """A station's labelled films -> adapt-site refuses below the minimum, prints before/after in a dry
    run, stores v1 -> the daemon triages the station's next films with the head: the SR in Orthanc
    names it and the urgent flag follows the head's threshold -> --rollback."""
    import csv as _csv
    import io
    import json

    from conftest import cli, storescu, wait_until
    from dicomgen import make_cr, uid
    from helpers_model import make_checkpoint
    from pydicom import dcmread
    from test_onboarding import _events, _texts

    from cxr_node.encode.sr import read_findings

    orthanc = orthanc_factory().start()
    ckpt = make_checkpoint(tmp_path / "model.pt", input_size=64)
    station = "site-b"
    node = node_factory("adapt", quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.3\nretry_base_seconds = 1\nretry_max_seconds = 2\n"
        "[onboarding]\nmin_per_class = 6\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        f'[[stations]]\nae_title = "SITEB"\nname = "{station}"\nmode = "active"\n'))
    node.start()
    studies = [uid() for _ in range(36)]
    labels = {s: ("COVID" if i % 2 else "Normal") for i, s in enumerate(studies)}
    files = []
    for i, s in enumerate(studies):
        f = make_cr(tmp_path / "films" / f"{i}.dcm", study_uid=s, rows=128, cols=128, seed=i, patient_id=f"P{i}")
        files.append(_blobbed(f, i) if labels[s] == "COVID" else f)
    assert storescu(node.port, *files, aet="SITEB").returncode == 0
    wait_until(lambda: len(_events(node, "study.processed")) >= 36, 300, "36 studies processed", node)
    fb = tmp_path / "labels.csv"
    with open(fb, "w", newline="") as fh:
        w = _csv.writer(fh)
        w.writerow(["study_uid", "label", "reader"])
        w.writerows([s, lab, "dr.a"] for s, lab in labels.items())
    cli("feedback", "import", str(fb), config=node.config)

    p = cli("adapt-site", "--station", "SITEB", "--min-per-class", "19", "--yes", config=node.config, check=False)
    assert p.returncode == 1 and "too few labelled films to adapt: COVID 18 vs not COVID 18" in p.stderr
    p = cli("adapt-site", "--station", station, "--dry-run", "--bootstrap", "300", config=node.config, timeout=300)
    assert "36 labelled film(s) of 36 patient(s)" in p.stdout and "COVID: AUC model" in p.stdout
    assert "gate passed: challenger wins" in p.stdout and "nothing stored (--dry-run)" in p.stdout
    assert _events(node, "adaptation.site") == []
    p = cli("adapt-site", "--station", station, "--yes", "--bootstrap", "300", config=node.config, timeout=300)
    assert f"station {station}: site {station} head v1 stored and active for COVID" in p.stdout
    (ev,) = _events(node, "adaptation.site")
    assert ev["detail"]["auc"]["COVID"]["ci95"][0] > 0 and ev["detail"]["version"] == 1
    threshold = ev["detail"]["thresholds"]["COVID"]
    with node.db() as c:  # the drift reference from now on: the fitting films as the head calls them
        (report,) = c.execute("select report from site_heads where station = ? and active", (station,)).fetchone()
    assert json.loads(report)["reference"]["n"] == 36

    new = [uid() for _ in range(2)]
    more = [make_cr(tmp_path / "new" / f"{i}.dcm", study_uid=s, rows=128, cols=128, seed=100 + i) for i, s in
            enumerate(new)]
    _blobbed(more[0], 100)
    assert storescu(node.port, *more, aet="SITEB").returncode == 0
    srs = wait_until(lambda: [i for s in new for i in orthanc.find(StudyInstanceUID=s, Modality="SR")] if all(
        orthanc.find(StudyInstanceUID=s, Modality="SR") for s in new) else None, 120, "SRs in Orthanc", node)
    name = f"site {station} head v1"
    for inst in srs:
        sr = dcmread(io.BytesIO(orthanc.file(inst["ID"])))
        texts = _texts(sr)
        assert any(t.startswith(f"calibration {name}") for t in texts), texts
        (group,) = read_findings(sr)  # the head's operating point, beside the probability compared with it
        assert group["thresholds"]["COVID-19"] == pytest.approx(threshold, rel=5e-3)
    scs = wait_until(lambda: [i for s in new for i in orthanc.find(StudyInstanceUID=s, Modality="OT")] if all(
        orthanc.find(StudyInstanceUID=s, Modality="OT") for s in new) else None, 60, "SCs in Orthanc", node)
    for inst in scs:  # the Secondary Capture names the head too
        sc = dcmread(io.BytesIO(orthanc.file(inst["ID"])), stop_before_pixels=True)
        assert sc.DerivationDescription.endswith(f"operating points: {name}")
    for s in new:
        (t,) = _events(node, "image.triaged", study_uid=s)
        assert t["detail"]["calibration"] == name
        assert t["detail"]["urgent"] == bool(t["detail"]["probabilities"]["COVID"] >= threshold)
    # performance reports the films each decided: the model's 36 and the head's 2, apart
    for i, s in enumerate(new):
        cli("feedback", "add", "--study", s, "--label", "COVID" if i == 0 else "Normal", config=node.config)
    table = cli("performance", "--station", station, "--bootstrap", "100", config=node.config).stdout
    assert "triaged with model: 36 film(s)" in table and f"triaged with {name}: 2 film(s)" in table, table
    p = cli("adapt-site", "--station", station, "--rollback", config=node.config)
    assert f"site {station} head v1 retired; films are now triaged with model" in p.stdout
    assert len(_events(node, "adaptation.rollback")) == 1
    assert json.loads(json.dumps(_events(node, "adaptation.rollback")[0]["detail"]))["restored"] is None


def test_drift_is_measured_against_the_active_head_for_these_weights(tmp_path):
    """check_drift: a station with active site heads (for these weights) is compared with the heads'
    fitting films, on the films the heads triaged; heads for other weights leave the baseline."""
    from cxr_node import config
    from cxr_node.db import migrate
    from cxr_node.db.models import ImageResult, StationRow, utcnow
    from cxr_node.db.session import Database
    from cxr_node.onboarding import site_adaptation as sa
    from cxr_node.onboarding import stations

    settings = config.parse({"storage": {"data_dir": str(tmp_path)},
                             "onboarding": {"drift_window": 20, "drift_min_films": 10, "drift_threshold": 0.5}},
                            base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    rng = np.random.default_rng(0)
    with db.transaction() as s:
        now = utcnow()
        s.add(StationRow(name="st1", ae_title="ST1", mode="active", configured=True, mode_since=now, created_at=now))
        for i in range(40):
            p = rng.dirichlet([1, 1, 1])
            s.add(ImageResult(study_uid=f"1.2.{i}", study_version=1, sop_instance_uid=f"1.2.{i}.1", analysed=True,
                              model_version="m1", top_label=LABELS[int(p.argmax())], urgent=False, priority="routine",
                              probabilities=dict(zip(LABELS, map(float, p))), created_at=now, station="st1",
                              calibration="site st1 head v1" if i >= 20 else "model", temperature=1.0,
                              image_stats={"rows": 128, "cols": 128, "mean": 0.5, "std": 0.2}))
    with db.session() as s:
        rows = list(s.query(ImageResult).order_by(ImageResult.id))[:20]
        ref = stations.reference_from(rows, LABELS)
    res = _fit(*_site())
    sa.store(db, dict(res, reference=ref))
    out = stations.check_drift(settings, db, ["st1"], LABELS, "a" * 64)
    assert out["st1"]["reference"] == "site st1 head v1"
    out = stations.check_drift(settings, db, ["st1"], LABELS, "b" * 64)  # other weights: not the head's
    assert out["st1"]["reference"] == "baseline (first films)"
