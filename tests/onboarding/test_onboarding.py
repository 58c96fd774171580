"""Site onboarding end to end, against the real daemon and a real Orthanc as the PACS.

A new station sends films in shadow mode (analysed, kept, nothing reaches Orthanc); readers'
labels are imported; `performance` agrees with an independent computation from the audit trail;
`calibrate-site` refuses below the minimum and succeeds above it; the station goes active and its
results reach Orthanc naming the site calibration; films of another kind then drive the station
past the drift threshold and `station.drift` is audited. Generated films and a tiny random model:
no external data."""

from __future__ import annotations

import csv
import io
import json
import urllib.request

import numpy as np
import pytest
from conftest import cli, free_port, storescu
from conftest import wait_until as _wait
from dicomgen import make_cr, uid
from helpers_model import LABELS, make_checkpoint
from pydicom import dcmread

from cxr_node.encode.sr import read_findings

STATION = "site-a"
AET = "SITEA"




def _events(node, event: str, **match) -> list[dict]:
    """Audit rows read straight from the node's SQLite database (polling through `cxr-node audit`
    would start a Python process per poll); the CLI's view is checked where it matters."""
    with node.db() as c:
        rows = c.execute("select id, event, outcome, study_uid, reason, detail from audit_events where event = ? "
                         "order by id", (event,)).fetchall()
    out = [{"id": r[0], "event": r[1], "outcome": r[2], "study_uid": r[3], "reason": r[4],
            "detail": json.loads(r[5]) if r[5] else None} for r in rows]
    return [r for r in out if all(r.get(k) == v for k, v in match.items())]


def _texts(ds) -> list[str]:
    """Every TextValue in an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(_texts(item))
    return out


def _independent(films: list[dict], labels: dict[str, str]) -> dict:
    """Sensitivity and specificity per class (top class as the prediction) and the urgent flag's
    precision and recall, computed here from image.triaged audit rows and the labels we gave."""
    out = {}
    for name in LABELS:
        tp = sum(labels[f["study_uid"]] == name and f["detail"]["top_label"] == name for f in films)
        fn = sum(labels[f["study_uid"]] == name and f["detail"]["top_label"] != name for f in films)
        tn = sum(labels[f["study_uid"]] != name and f["detail"]["top_label"] != name for f in films)
        fp = sum(labels[f["study_uid"]] != name and f["detail"]["top_label"] == name for f in films)
        out[name] = (tp, fn, tn, fp)
    utp = sum(labels[f["study_uid"]] == "COVID" and f["detail"]["urgent"] for f in films)
    ufp = sum(labels[f["study_uid"]] != "COVID" and f["detail"]["urgent"] for f in films)
    ufn = sum(labels[f["study_uid"]] == "COVID" and not f["detail"]["urgent"] for f in films)
    out["urgent"] = (utp, ufp, ufn)
    return out


def test_a_new_site_from_shadow_to_active_with_its_own_calibration_and_a_drift_alarm(
        node_factory, orthanc_factory, tmp_path):
    orthanc = orthanc_factory().start()
    ckpt = make_checkpoint(tmp_path / "model.pt", input_size=64)
    metrics_port = free_port()
    station_cfg = f'[[stations]]\nae_title = "{AET}"\nname = "{STATION}"\nmode = "shadow"\n'
    node = node_factory("site", quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.3\nretry_base_seconds = 1\nretry_max_seconds = 2\n"
        f"[metrics]\nport = {metrics_port}\n"
        "[onboarding]\nmin_per_class = 3\ndrift_window = 9\ndrift_min_films = 6\ndrift_threshold = 0.5\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        + station_cfg))
    node.start()

    # 1. shadow: 9 films (one study each) are analysed and kept; nothing reaches the PACS
    studies = [uid() for _ in range(9)]
    files = [make_cr(tmp_path / "shadow" / f"{i}.dcm", study_uid=s, rows=128, cols=128, seed=i,
                     patient_id=f"P{i}") for i, s in enumerate(studies)]
    for i, f in enumerate(files):  # accession numbers, for the feedback file
        ds = dcmread(f)
        ds.AccessionNumber = f"ACC{i:03d}"
        ds.save_as(f, enforce_file_format=True)
    assert storescu(node.port, *files, aet=AET).returncode == 0
    _wait(lambda: len(_events(node, "study.processed")) >= 9, 120, "9 studies processed", node)
    shadow = _events(node, "study.shadow")
    assert {r["study_uid"] for r in shadow} == set(studies)
    assert all(r["detail"]["station"] == STATION for r in shadow)
    (added,) = _events(node, "station.added")
    assert added["detail"] == {"station": STATION, "mode": "shadow", "configured": True}
    assert _events(node, "outbox.queued") == [] and orthanc.rest("GET", "/instances") == []
    assert len(list((node.data_dir / "outbox" / studies[0]).glob("*.dcm"))) == 2  # kept: SC + SR
    triaged = {r["study_uid"]: r for r in _events(node, "image.triaged")}
    assert {r["detail"]["calibration"] for r in triaged.values()} == {"model"}

    # 2. feedback: a bad file is refused whole, each problem on its line
    labels = {s: LABELS[i % 3] for i, s in enumerate(studies)}
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "accession_number", "label", "reader", "time"])
        w.writerow([studies[0], "", "COVID", "dr.a", "2026-11-23T10:00:00Z"])
        w.writerow(["1.2.3.404", "", "COVID", "dr.a", ""])
        w.writerow([studies[1], "", "Pneumothorax", "dr.a", ""])
    p = cli("feedback", "import", str(bad), config=node.config, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "line 3: study 1.2.3.404: not known to this node" in p.stdout
    assert "line 4: unknown label 'Pneumothorax'" in p.stdout and "nothing imported" in p.stdout
    assert json.loads(cli("feedback", "list", "--format", "json", config=node.config).stdout) == []

    good = tmp_path / "labels.csv"
    with open(good, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "accession_number", "label", "reader", "time"])
        for i, s in enumerate(studies):
            # half by study UID, half by accession number; one label wrong at first (superseded below)
            first = "Normal" if i == 0 else labels[s]
            w.writerow([s if i % 2 else "", "" if i % 2 else f"ACC{i:03d}", first.lower(), "dr.a",
                        "2026-11-23T10:00:00Z"])
        w.writerow([studies[1], "", labels[studies[1]], "dr.a", ""])  # the same row twice
    p = cli("feedback", "import", str(good), config=node.config)
    assert f"{good}: 9 label(s) stored (0 superseding an earlier label), 1 duplicate(s) skipped" in p.stdout
    assert "line 11: duplicate of line 3" in p.stdout
    p = cli("feedback", "import", str(good), config=node.config)  # again: all duplicates, nothing new
    assert "0 label(s) stored" in p.stdout and p.stdout.count("already labelled") == 9
    p = cli("feedback", "add", "--study", studies[0], "--label", "COVID", "--reader", "dr.b", config=node.config)
    assert "labelled 'COVID' by dr.b" in p.stdout and "supersedes 'Normal'" in p.stdout
    hist = json.loads(cli("feedback", "list", "--study", studies[0], "--format", "json", config=node.config).stdout)
    assert [(h["label"], h["reader"], h["superseded_by"] is not None) for h in hist] == [
        ("Normal", "dr.a", True), ("COVID", "dr.b", False)]
    story = cli("audit", "study", studies[0], config=node.config).stdout
    assert "study.shadow" in story and "labelled COVID by dr.b at " in story and "(cli); supersedes Normal" in story
    added = _events(node, "feedback.added", study_uid=studies[0])
    assert [r["detail"]["label"] for r in added] == ["Normal", "COVID"] and added[1]["reason"] == "supersedes 'Normal'"

    # 3. performance agrees with an independent computation from the audit trail and our labels
    out_dir = tmp_path / "perf"
    table = cli("performance", "--station", AET, "--out", str(out_dir), "--bootstrap", "200", config=node.config).stdout
    assert "films with a label: 9" in table and "NOTE: too few films" in table
    rep = json.loads((out_dir / "performance.json").read_text())
    assert rep["films"] == 9 and rep["counts"] == {"COVID": 3, "Normal": 3, "Viral Pneumonia": 3, "Other": 0}
    ind = _independent(list(triaged.values()), labels)
    for name in LABELS:
        tp, fn, tn, fp = ind[name]
        c = rep["per_class"][name]
        assert (c["tp"], c["fn"], c["tn"], c["fp"]) == (tp, fn, tn, fp)
        assert c["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
        assert c["specificity"]["value"] == pytest.approx(tn / (tn + fp))
        lo, hi = c["sensitivity"]["ci95"]
        assert lo - 1e-9 <= tp / (tp + fn) <= hi + 1e-9 and hi - lo > 0.3  # 3 films: a wide interval
    utp, ufp, ufn = ind["urgent"]
    assert rep["urgent_flag"]["recall"]["value"] == pytest.approx(utp / (utp + ufn))
    assert (rep["urgent_flag"]["tp"], rep["urgent_flag"]["fp"]) == (utp, ufp)
    assert sum(map(sum, rep["confusion_matrix"]["counts"])) == 9
    assert "too few films to mean much" in rep["too_few"]
    assert {p.name for p in out_dir.iterdir()} == {"performance.json", "roc.png", "reliability.png", "confusion.png"}

    # 4. calibrate-site refuses below the minimum, then stores version 1
    p = cli("calibrate-site", "--station", STATION, "--min-per-class", "4", "--yes", config=node.config, check=False)
    assert p.returncode == 1 and "too few labelled films to calibrate: COVID 3 (at least 4 films" in p.stderr
    p = cli("calibrate-site", "--station", STATION, config=node.config, check=False)
    assert p.returncode == 2 and "add --yes" in p.stderr
    assert _events(node, "calibration.site") == []
    # 9 films of a tiny random model: the fit is nonsense (issue 22), refused; stored only when forced
    p = cli("calibrate-site", "--station", STATION, "--yes", config=node.config, check=False)
    assert p.returncode == 1 and "calibration refused, nothing stored" in p.stderr
    p = cli("calibrate-site", "--station", STATION, "--yes", "--store-anyway", config=node.config)
    assert "stored although" in p.stderr
    assert "urgent flag" in p.stdout and "temperature" in p.stdout  # the before/after figures
    assert f"station {STATION}: site {STATION} v1 stored and active" in p.stdout
    (cal,) = node.events("calibration.site")  # through `cxr-node audit`
    assert cal["detail"]["version"] == 1 and cal["detail"]["films"] == 9 and cal["detail"]["refusals_overridden"]
    site_t = cal["detail"]["temperature"]
    site_th = cal["detail"]["thresholds"]

    # 5. the station goes active (config edit + restart: audited); resend delivers a shadow result
    node.stop()
    node.config.write_text(node.config.read_text().replace(station_cfg, station_cfg.replace("shadow", "active")))
    node.start(upgrade=False)
    (mode,) = _events(node, "station.mode")
    assert mode["detail"]["from"] == "shadow" and mode["detail"]["to"] == "active"
    assert "2 queued" in cli("resend", studies[0], config=node.config).stdout
    _wait(lambda: len(orthanc.find(StudyInstanceUID=studies[0])) == 2, 60, "resent results in Orthanc", node)

    new = [uid() for _ in range(2)]
    more = [make_cr(tmp_path / "active" / f"{i}.dcm", study_uid=s, rows=128, cols=128, seed=100 + i)
            for i, s in enumerate(new)]
    assert storescu(node.port, *more, aet=AET).returncode == 0
    srs = _wait(lambda: [i for s in new for i in orthanc.find(StudyInstanceUID=s, Modality="SR")] if all(
        orthanc.find(StudyInstanceUID=s, Modality="SR") for s in new) else None, 120, "SRs in Orthanc", node)
    name = f"site {STATION} v1"
    for inst in srs:
        sr = dcmread(io.BytesIO(orthanc.file(inst["ID"])))
        assert any(f"calibration {name} temperature {site_t:.4f}" == t for t in _texts(sr)), _texts(sr)
        (group,) = read_findings(sr)  # the site's operating point, beside the probability it was compared with
        assert group["thresholds"]["COVID-19"] == pytest.approx(site_th["COVID"], rel=5e-3)
    scs = [i for s in new for i in orthanc.find(StudyInstanceUID=s, Modality="OT")]
    assert len(scs) == 2
    for inst in scs:
        sc = dcmread(io.BytesIO(orthanc.file(inst["ID"])), stop_before_pixels=True)
        assert sc.DerivationDescription.endswith(f"operating points: {name}")
    for s in new:
        (t,) = _events(node, "image.triaged", study_uid=s)
        assert t["detail"]["calibration"] == name and t["detail"]["temperature"] == pytest.approx(site_t)
        p_site = np.array(list(t["detail"]["probabilities"].values()))
        assert t["detail"]["urgent"] == bool(p_site[0] >= site_th["COVID"])
    assert _events(node, "station.drift") == []

    # 6. films of another kind (another detector: other size, other exposure) move the station
    other = [make_cr(tmp_path / "other" / f"{i}.dcm", rows=224, cols=176, seed=200 + i) for i in range(6)]
    assert storescu(node.port, *other, aet=AET).returncode == 0
    (drift,) = _wait(lambda: _events(node, "station.drift"), 120, "station.drift", node)
    moved = {m["statistic"] for m in drift["detail"]["moved"]}
    assert {"rows", "cols"} <= moved and drift["outcome"] == "warning"
    assert drift["detail"]["reference"] == name and drift["detail"]["station"] == STATION
    assert "rows PSI" in drift["reason"]
    st = json.loads(cli("status", "--format", "json", config=node.config).stdout)
    (sta,) = st["stations"]
    assert sta["mode"] == "active" and sta["calibration"] == name and sta["drift"]["state"] == "drifted"
    assert any(w.startswith(f"station {STATION} has drifted") for w in st["warnings"])
    text = cli("status", config=node.config).stdout
    assert f"station     {STATION} ({AET}): ACTIVE, site {STATION} v1 calibration, DRIFTED from site {STATION} v1: " \
        in text and "rows PSI" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        scrape = r.read().decode()
    assert f'cxr_node_station_drifted{{station="{STATION}"}} 1.0' in scrape
    assert f'cxr_node_station_shadow{{station="{STATION}"}} 0.0' in scrape

    # 7. rollback: the model's operating points again
    p = cli("calibrate-site", "--station", STATION, "--rollback", config=node.config)
    assert f"site {STATION} v1 retired; films are now triaged with model operating points" in p.stdout
    assert len(_events(node, "calibration.rollback")) == 1
    node.stop()


def test_drift_statistics_alarm_on_a_real_shift_and_not_on_noise():
    """In process: the PSI with its chance guard, on statistics like the daemon records."""
    from types import SimpleNamespace

    from cxr_node.onboarding import drift as stations  # the PSI statistics

    rng = np.random.default_rng(1)

    def films(n, rows, mean, p_covid):
        return [SimpleNamespace(id=None, calibration=None, analysed=True, ood_score=float(rng.normal(3, 0.5)), probabilities={
            "COVID": float(np.clip(rng.normal(p_covid, 0.05), 0, 1)), "Normal": 0.5, "Viral Pneumonia": 0.0},
            image_stats={"rows": rows, "cols": rows, "mean": float(rng.normal(mean, 0.01)), "std": 0.2})
            for _ in range(n)]

    ref = stations.reference_from(films(200, 2048, 0.5, 0.1), LABELS)
    same = stations.compare(ref, films(200, 2048, 0.5, 0.1), LABELS, 0.25)
    assert same["moved"] == [] and max(same["psi"].values()) < 0.25
    other = stations.compare(ref, films(200, 3000, 0.56, 0.4), LABELS, 0.25)
    moved = {m["statistic"] for m in other["moved"]}
    assert {"rows", "cols", "intensity_mean", "p:COVID"} <= moved and "ood_score" not in moved
    assert "rows PSI" in stations.describe(other["moved"])
    # films the out-of-domain check refuses count as refusals; a lateral view (a header rule) does not
    from cxr_node.eligibility import rules as eligibility

    def refused(n, reason):
        return [SimpleNamespace(id=None, calibration=None, analysed=False, reason=reason, ood_score=9.0,
                                probabilities=None, image_stats={"rows": 2048, "cols": 2048}) for _ in range(n)]

    mixed = films(140, 2048, 0.5, 0.1) + refused(60, eligibility.ood_reason(9.0, 5.0))
    assert "refused" in {m["statistic"] for m in stations.compare(ref, mixed, LABELS, 0.25)["moved"]}
    lateral = films(140, 2048, 0.5, 0.1) + refused(60, "ViewPosition is LL, not a frontal view")
    assert "refused" not in {m["statistic"] for m in stations.compare(ref, lateral, LABELS, 0.25)["moved"]}
    # a dozen films cannot show a small wobble as drift (chance explains it), but a new detector shows
    small = stations.reference_from(films(12, 128, 0.5, 0.1), LABELS)
    assert stations.compare(small, films(12, 128, 0.5, 0.1), LABELS, 0.5)["moved"] == []
    assert "rows" in {m["statistic"] for m in stations.compare(small, films(12, 224, 0.5, 0.1), LABELS, 0.5)["moved"]}
    # ... and it is the chance guard that keeps a small sample's wobble out, not the threshold: the same
    # kind of wobble passes a 0.2 PSI threshold and is still not called drift
    wobble = stations.compare(small, films(12, 128, 0.5, 0.1), LABELS, 0.2)
    assert max(wobble["psi"].values()) > 0.2 and wobble["moved"] == [], wobble["psi"]


def test_feedback_api_performance_and_site_calibration_in_process(tmp_path):
    """The Python API the CLI and the web console use, on a real (migrated) database: labels with
    history, an import that stores nothing when a row is wrong, performance, and a site calibration
    fitted, stored, refused and rolled back."""
    import datetime as dt

    from cxr_node import config
    from cxr_node.db import migrate
    from cxr_node.db.models import ImageResult, Study, utcnow
    from cxr_node.db.session import Database
    from cxr_node.onboarding import feedback, performance
    from cxr_node.onboarding import site_calibration as sc

    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    rng = np.random.default_rng(3)
    truth = {}
    with db.transaction() as s:
        now = utcnow()
        for i in range(120):
            uid_, label = f"1.2.3.{i}", LABELS[i % 3]
            s.add(Study(study_uid=uid_, state="processed", version=1, patient_id=f"P{i}", first_received_at=now,
                        last_received_at=now, state_changed_at=now, accession_number=f"A{i}"))
            logit = rng.normal(0, 1, 3)
            logit[i % 3] += 1.5  # an informative, over-confident model
            p = np.exp(logit * 2) / np.exp(logit * 2).sum()
            s.add(ImageResult(study_uid=uid_, study_version=1, sop_instance_uid=f"{uid_}.1", analysed=True,
                              model_version="m1", top_label=LABELS[int(p.argmax())], urgent=bool(p[0] >= 0.5),
                              priority="routine", probabilities=dict(zip(LABELS, map(float, p))), created_at=now,
                              station="st1", calibration="model", temperature=1.0,
                              image_stats={"rows": 128, "cols": 128, "mean": 0.5, "std": 0.2}))
            truth[uid_] = label

    # one label at a time: a Database, a session, an Engine all work; a repeat stores nothing
    out = feedback.add_label(db, "1.2.3.0", "covid", "dr.a", labelled_at="2026-11-20T08:00:00Z")
    assert out.feedback.label == "COVID" and out.feedback.labelled_at == dt.datetime(2026, 11, 20, 8, tzinfo=dt.timezone.utc)
    assert feedback.add_label(db.engine, "1.2.3.0", "COVID", "dr.a").feedback is None  # duplicate
    with db.transaction() as s:
        later = feedback.add_label(s, None, "Normal", "dr.b", accession_number="A0", source="web")
    assert later.superseded.label == "COVID"
    with pytest.raises(feedback.FeedbackError, match="unknown label 'Fracture'"):
        feedback.add_label(db, "1.2.3.1", "Fracture")
    with pytest.raises(feedback.FeedbackError, match="not known to this node"):
        feedback.add_label(db, "9.9.9", "COVID")
    with db.session() as s:
        assert [f.label for f in feedback.history(s, "1.2.3.0")] == ["COVID", "Normal"]
        assert feedback.current(s, "1.2.3.0").reader == "dr.b"

    # an import with one bad row stores nothing; fixed, it stores every row in one go
    rows = [("study_uid", "label", "reader")] + [(u, lab, "dr.c") for u, lab in truth.items()]
    path = tmp_path / "f.csv"
    path.write_text("\n".join(",".join(r) for r in rows + [("1.2.3.5", "Nonsense", "x")]) + "\n")
    rep = feedback.import_csv(db, path)
    assert not rep.ok and rep.problems == ["line 122: unknown label 'Nonsense' (known: COVID, Normal, "
                                           "Viral Pneumonia, Abnormal, Other)"]
    with db.session() as s:
        assert feedback.current(s, "1.2.3.1") is None
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    rep = feedback.import_csv(db, path, dry_run=True)
    assert rep.ok and rep.stored == 120
    with db.session() as s:
        assert feedback.current(s, "1.2.3.1") is None  # a dry run stores nothing
    rep = feedback.import_csv(db, path)
    assert rep.ok and rep.stored == 120 and rep.superseded == 1  # 1.2.3.0: Normal -> COVID again

    with db.session() as s:
        films = performance.labelled_films(s, station="st1")
    report = performance.compute(films, LABELS, ["COVID"], n_boot=100)
    covid = report["per_class"]["COVID"]
    assert covid["positives"] == 40 and covid["tp"] + covid["fn"] == 40 and report["films"] == 120
    assert report["urgent_flag"]["tp"] == sum(f.urgent and f.label == "COVID" for f in films)

    model = sc.ModelInfo(tuple(LABELS), ("COVID",), "m1", "a" * 64, 1.0, {"COVID": 0.5, "Normal": 0.5,
                                                                           "Viral Pneumonia": 0.5})
    with db.session() as s, pytest.raises(sc.CalibrationRefused, match="COVID 40 .at least 50"):
        sc.fit(s, "st1", model, target_sensitivity=0.9, min_per_class=50)
    with db.session() as s:
        res = sc.fit(s, "st1", model, target_sensitivity=0.9, min_per_class=30)
    assert res["after"]["urgent_flag"]["sensitivity"]["value"] >= 0.9
    assert res["temperature"] > 1.2  # the over-confident model is softened
    v1 = sc.store(db, res)
    v2 = sc.store(db, res)
    assert (v1.version, v2.version) == (1, 2)
    with db.session() as s:
        assert sc.active(s, "st1").version == 2
    cur, prev = sc.rollback(db, "st1")
    assert (cur.version, prev.version) == (2, 1)
    sc.rollback(db, "st1")
    with db.session() as s:
        assert sc.active(s, "st1") is None
    with pytest.raises(sc.CalibrationRefused, match="nothing to roll back"):
        sc.rollback(db, "st1")
    db.dispose()
