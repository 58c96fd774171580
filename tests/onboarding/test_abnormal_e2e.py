"""A station's abnormal operating point end to end (issue 26 item 5), against the real daemon: a
v5-kind model (an abnormality output) at an operating point no film reaches; readers label the
station's films Normal / Abnormal (and a pattern); `calibrate-site` fits the station's operating
point on p(abnormal) and stores it; the daemon's next films from the station are urgent by it, the
SR names the site's calibration; `--rollback` restores the model's own; `adapt-site` runs its
champion/challenger gate on p(abnormal)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import cli, storescu, wait_until
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread
from test_adaptation import _blobbed
from test_onboarding import _events, _texts

STATION = "site-c"
AET = "SITEC"
MODEL_POINT = 0.999  # the model's own operating point: no film here reaches it


def _film(tmp_path, name: str, seed: int, blob: bool):
    f = make_cr(tmp_path / "films" / f"{name}.dcm", study_uid=uid(), rows=128, cols=128, seed=seed,
                patient_id=f"P{name}")
    return _blobbed(f, seed) if blob else f


def test_the_station_operating_point_on_p_abnormal_changes_the_urgent_flag(node_factory, tmp_path):
    ckpt = make_checkpoint(tmp_path / "v5.pt", input_size=64, abnormal_threshold=MODEL_POINT)
    node = node_factory("abn", quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n[onboarding]\nmin_per_class = 6\n'
        f'[[stations]]\nae_title = "{AET}"\nname = "{STATION}"\nmode = "active"\n'))
    node.start()
    files = [_film(tmp_path, str(i), i, blob=i % 2 == 1) for i in range(16)]
    assert storescu(node.port, *files, aet=AET).returncode == 0
    wait_until(lambda: len(_events(node, "study.processed")) >= 16, 300, "16 studies processed", node)
    with node.db() as c:
        rows = c.execute("select study_uid, abnormal, urgent, calibration from image_results where analysed "
                         "order by abnormal desc").fetchall()
    assert len(rows) == 16 and all(r[1] is not None and r[1] < MODEL_POINT and not r[2] and r[3] == "model"
                                   for r in rows)
    # the readers call the 8 highest p(abnormal) abnormal (two by a pattern's name) and the rest normal
    labels = {r[0]: ("COVID" if i < 2 else "Abnormal") if i < 8 else "Normal" for i, r in enumerate(rows)}
    fb = tmp_path / "labels.csv"
    with open(fb, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "label", "reader"])
        w.writerows([s, lab, "dr.a"] for s, lab in labels.items())
    assert "16 label(s) stored" in cli("feedback", "import", str(fb), config=node.config).stdout

    p = cli("calibrate-site", "--station", STATION, "--min-per-class", "9", "--dry-run", config=node.config,
            check=False)
    assert p.returncode == 1 and "abnormal 8, normal 8 (at least 9 of each" in p.stderr
    p = cli("calibrate-site", "--station", STATION, "--min-per-class", "6", "--target-sensitivity", "0.85", "--yes",
            config=node.config)
    assert "operating point" in p.stdout and f"site {STATION} v1 stored and active" in p.stdout
    (ev,) = _events(node, "calibration.site")
    point = ev["detail"]["abnormal_threshold"]
    assert point == pytest.approx(rows[6][1])  # 7 of 8 abnormal films flagged: ceil(0.85 * 8)
    assert ev["detail"]["after"]["sensitivity"]["k"] == 7 and ev["detail"]["before"]["sensitivity"]["k"] == 0

    # the same films again, as new studies: the highest is urgent now, by the site's operating point
    top, low = _match(files, rows[0][0]), _match(files, rows[-1][0])
    again = []
    for name, src in (("top", top), ("low", low)):
        ds = dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid(), uid(), uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        again.append((ds.StudyInstanceUID, tmp_path / f"{name}.dcm"))
    assert storescu(node.port, *[f for _, f in again], aet=AET).returncode == 0
    wait_until(lambda: len(_events(node, "study.processed")) >= 18, 120, "2 more studies processed", node)
    name = f"site {STATION} v1"
    for (study, _), urgent in zip(again, (True, False)):
        (t,) = _events(node, "image.triaged", study_uid=study)
        assert t["detail"]["calibration"] == name and t["detail"]["urgent"] is urgent, t["detail"]
        assert t["detail"]["urgent"] == (t["detail"]["abnormal"] >= point)
    sr = _sr(node, again[0][0])
    assert any(f"calibration {name}" in x for x in _texts(sr)), _texts(sr)  # the algorithm parameter names it

    p = cli("calibrate-site", "--station", STATION, "--rollback", config=node.config)
    assert f"{name} retired; films are now triaged with model operating points" in p.stdout
    ds = dcmread(again[0][1])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid(), uid(), uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "third.dcm", enforce_file_format=True)
    assert storescu(node.port, tmp_path / "third.dcm", aet=AET).returncode == 0
    wait_until(lambda: _events(node, "image.triaged", study_uid=ds.StudyInstanceUID), 120, "third triaged", node)
    (t,) = _events(node, "image.triaged", study_uid=ds.StudyInstanceUID)
    assert t["detail"]["calibration"] == "model" and t["detail"]["urgent"] is False

    # adapt-site on this model works on the same axis; the labels follow the model's own p(abnormal)
    # here, so no head can beat it: the champion stays and nothing is stored
    p = cli("adapt-site", "--station", STATION, "--min-per-class", "5", "--bootstrap", "200", "--yes",
            config=node.config, check=False, timeout=300)
    assert "abnormal 8 vs normal 8" in p.stdout and "Abnormal: AUC model 1.000" in p.stdout, p.stdout + p.stderr
    assert p.returncode == 1 and "nothing stored" in p.stdout and _events(node, "adaptation.site") == []


def _match(files, study_uid: str):
    return next(f for f in files if dcmread(f, stop_before_pixels=True).StudyInstanceUID == study_uid)


def _sr(node, study_uid: str):
    """The study's SR as the daemon wrote it into its outbox folder."""
    for f in sorted((node.data_dir / "outbox").rglob("*.dcm")):
        ds = dcmread(f, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid and ds.Modality == "SR":
            return ds
    raise AssertionError(f"no SR for {study_uid} under {node.data_dir / 'outbox'}: "
                         f"{json.dumps([str(p) for p in (node.data_dir / 'outbox').rglob('*')][:20])}")
