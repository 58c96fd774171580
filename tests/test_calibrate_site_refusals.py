"""`cxr-node calibrate-site` must not store nonsense (issue 22): a fit whose temperature or
thresholds sit at the edge of what is allowed, or whose bootstrap interval says the labels cannot
support it, is refused with the reason and what to do. The command runs as a subprocess on a real
(migrated) database holding the bundled model's results and readers' labels."""

from __future__ import annotations

import numpy as np

from conftest import cli

LABELS = ["COVID", "Normal", "Viral Pneumonia"]


def _site(tmp_path, films_per_class: int, separation: float, seed: int = 0):
    """A node's config and database with ``3 * films_per_class`` labelled films of station st1,
    triaged by the bundled model (its version and temperature), whose true class got ``separation``
    added to its logit."""
    from cxr_node import config
    from cxr_node.onboarding import feedback
    from cxr_node.db.models import ImageResult, Study, utcnow
    from cxr_node.db.session import Database
    from cxr_node.onboarding.site_calibration import ModelInfo

    cfg = tmp_path / f"cxr-{films_per_class}-{separation}.toml"
    data = tmp_path / f"data-{films_per_class}-{separation}"
    cfg.write_text(f'[storage]\ndata_dir = "{data}"\n[model]\npreload = false\n')
    cli("db", "upgrade", config=cfg)
    settings = config.load(cfg)
    model = ModelInfo.from_checkpoint(settings.model.checkpoint)
    db = Database(settings.database.url)
    rng = np.random.default_rng(seed)
    rows = []
    with db.transaction() as s:
        now = utcnow()
        for i in range(3 * films_per_class):
            uid = f"1.2.3.{i}"
            k = i % 3
            s.add(Study(study_uid=uid, state="processed", version=1, patient_id=f"P{i}", first_received_at=now,
                        last_received_at=now, state_changed_at=now))
            logit = rng.normal(0, 1, 3)
            logit[k] += separation
            p = np.exp(logit / model.temperature) / np.exp(logit / model.temperature).sum()
            s.add(ImageResult(study_uid=uid, study_version=1, sop_instance_uid=f"{uid}.1", analysed=True,
                              model_version=model.version, top_label=LABELS[int(p.argmax())], urgent=bool(p[0] >= 0.5),
                              priority="routine", probabilities=dict(zip(LABELS, map(float, p))), created_at=now,
                              station="st1", calibration="model", temperature=model.temperature,
                              image_stats={"rows": 128, "cols": 128, "mean": 0.5, "std": 0.2}))
            rows.append((uid, LABELS[k]))
    for uid, label in rows:
        feedback.add_label(db, uid, label, "dr.a")
    db.dispose()
    return cfg


def test_a_perfectly_separated_handful_is_refused_at_the_edge(tmp_path):
    """The issue's case: 5 films per class that the model separates perfectly: the fit drives the
    temperature to its bound and every threshold to 1.0."""
    cfg = _site(tmp_path, 5, separation=8.0)
    p = cli("calibrate-site", "--station", "st1", "--min-per-class", "5", "--dry-run", config=cfg, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "calibration refused, nothing stored" in p.stderr
    assert "sits at the edge of what the fit allows" in p.stderr or "at the edge of 0..1" in p.stderr
    assert "Label more of its films" in p.stderr and "keeps its model operating points" in p.stderr
    assert "temperature" not in p.stdout  # no figures printed as if the fit were usable
    p = cli("calibrate-site", "--station", "st1", "--min-per-class", "5", "--yes", config=cfg, check=False)
    assert p.returncode == 1
    assert cli("audit", "--event", "calibration.site", "--format", "json", config=cfg).stdout.strip() == "[]"


def test_too_few_noisy_labels_are_refused_by_the_bootstrap_and_enough_are_stored(tmp_path):
    cfg = _site(tmp_path, 6, separation=1.0, seed=1)
    p = cli("calibrate-site", "--station", "st1", "--min-per-class", "5", "--dry-run", config=cfg, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "bootstrap 95% interval" in p.stderr and "the labels cannot support it" in p.stderr

    cfg = _site(tmp_path, 150, separation=1.5, seed=2)
    p = cli("calibrate-site", "--station", "st1", "--min-per-class", "50", "--yes", config=cfg, check=False)
    assert p.returncode == 0, p.stderr
    assert "site st1 v1 stored and active" in p.stdout


def test_store_anyway_stores_and_audits_what_was_overridden(tmp_path):
    cfg = _site(tmp_path, 5, separation=8.0)
    p = cli("calibrate-site", "--station", "st1", "--min-per-class", "5", "--yes", "--store-anyway", config=cfg)
    assert "stored although" in p.stderr and "site st1 v1 stored and active" in p.stdout
    import json

    (row,) = json.loads(cli("audit", "--event", "calibration.site", "--format", "json", config=cfg).stdout)
    assert row["detail"]["refusals_overridden"] and "edge" in row["detail"]["refusals_overridden"][0]
