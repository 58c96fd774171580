"""Alembic migrations: upgrade, real downgrade, and serve refusing an unmigrated database."""

from __future__ import annotations

import sqlite3

from conftest import cli


def _tables(db):
    with sqlite3.connect(db) as c:
        return {r[0] for r in c.execute("select name from sqlite_master where type='table'")}


def test_upgrade_downgrade_upgrade(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    db = tmp_path / "d" / "cxr-node.db"
    assert "0016" in cli("db", "upgrade", config=cfg).stdout
    assert {"audit_events", "studies", "instances", "image_results", "outbox", "audit_chain_head",
            "stations", "feedback", "site_calibrations", "web_users", "web_sessions", "site_heads",
            "notifications", "nodes"} <= _tables(db)
    assert cli("db", "current", config=cfg).stdout.strip() == "0016"
    cli("db", "downgrade", "0010", config=cfg)
    assert "notifications" not in _tables(db) and "nodes" not in _tables(db) and "site_heads" in _tables(db)
    with sqlite3.connect(db) as c:
        assert "dimse_priority" not in {r[1] for r in c.execute("pragma table_info(instances)")}
        assert "claimed_by" not in {r[1] for r in c.execute("pragma table_info(outbox)")}
        assert "upstream_rank" not in {r[1] for r in c.execute("pragma table_info(studies)")}
    cli("db", "downgrade", "0008", config=cfg)
    assert "site_heads" not in _tables(db) and "web_users" in _tables(db)
    with sqlite3.connect(db) as c:
        assert "refusal_code" in {r[1] for r in c.execute("pragma table_info(image_results)")}
    cli("db", "downgrade", "0007", config=cfg)
    with sqlite3.connect(db) as c:
        assert "refusal_code" not in {r[1] for r in c.execute("pragma table_info(image_results)")}
        assert {"attempts", "retry_at"} <= {r[1] for r in c.execute("pragma table_info(studies)")}
    cli("db", "downgrade", "0006", config=cfg)
    with sqlite3.connect(db) as c:
        assert {"attempts", "retry_at"} & {r[1] for r in c.execute("pragma table_info(studies)")} == set()
    cli("db", "downgrade", "0005", config=cfg)
    assert _tables(db) & {"web_users", "web_sessions"} == set()
    assert {"stations", "feedback", "site_calibrations"} <= _tables(db)
    cli("db", "downgrade", "0004", config=cfg)
    assert _tables(db) & {"stations", "feedback", "site_calibrations"} == set()
    with sqlite3.connect(db) as c:
        assert "station" not in {r[1] for r in c.execute("pragma table_info(image_results)")}
    cli("db", "downgrade", "0003", config=cfg)
    with sqlite3.connect(db) as c:
        assert "removed_at" not in {r[1] for r in c.execute("pragma table_info(instances)")}
    cli("db", "downgrade", "0002", config=cfg)
    assert "audit_chain_head" not in _tables(db)
    cli("db", "downgrade", "0001", config=cfg)
    assert _tables(db) & {"image_results", "outbox"} == set()
    with sqlite3.connect(db) as c:
        assert "priority" not in {r[1] for r in c.execute("pragma table_info(studies)")}
    cli("db", "downgrade", "base", config=cfg)
    assert _tables(db) & {"audit_events", "studies", "instances"} == set()
    cli("db", "upgrade", config=cfg)
    assert {"audit_events", "studies", "instances"} <= _tables(db)


def test_top_finding_is_backfilled_from_the_rows_own_columns(tmp_path):
    """0016 fills image_results.finding from each analysed row (p(abnormal), else the most probable
    non-normal class of a flagged or review call, else the top class), never from the audit text."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    db = tmp_path / "d" / "cxr-node.db"
    cli("db", "upgrade", "0010", config=cfg)
    rows = [(1, None, "urgent", "Normal", '{"COVID": 0.4, "Normal": 0.45, "Viral Pneumonia": 0.15}'),
            (1, None, "routine", "Normal", '{"COVID": 0.1, "Normal": 0.8, "Viral Pneumonia": 0.1}'),
            (1, 0.87, "urgent", "Normal", '{"COVID": 0.2, "Normal": 0.7, "Viral Pneumonia": 0.1}'),
            (0, None, None, None, None)]
    with sqlite3.connect(db) as c:
        for i, (analysed, abnormal, priority, top, probs) in enumerate(rows):
            c.execute("insert into image_results (study_uid, study_version, sop_instance_uid, analysed, abnormal, "
                      "priority, top_label, probabilities, created_at) values (?, 1, ?, ?, ?, ?, ?, ?, "
                      "'2026-12-06 10:00:00')", ("1.2.3", f"1.2.3.{i}", analysed, abnormal, priority, top, probs))
    cli("db", "upgrade", config=cfg)
    with sqlite3.connect(db) as c:
        got = c.execute("select finding, finding_probability from image_results order by id").fetchall()
    assert got == [("COVID", 0.4), ("Normal", 0.8), ("abnormal", 0.87), (None, None)]


def test_serve_refuses_an_unmigrated_database(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n[node]\nport = 1\n')
    p = cli("serve", config=cfg, check=False, timeout=60)
    assert p.returncode == 1
    assert "run `cxr-node db upgrade` first" in p.stderr


def test_0008_backfills_refusal_codes_from_the_old_reasons(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    db = tmp_path / "d" / "cxr-node.db"
    cli("db", "upgrade", "0007", config=cfg)
    reasons = {"outside the training distribution (score 9.1, threshold 4.0)": "out_of_domain",
               "no lung fields found (one lung field on each side needed; found 0)": "no_lung_fields",
               "unusable pixels: DICOM image is colour": "pixels",
               "unusable header: NumberOfFrames cannot be read (ValueError)": "unreadable",
               "ViewPosition is LL: only frontal (PA/AP) films are analysed": "header",
               "BodyPartExamined is KNEE, not a chest value (CHEST, THORAX...)": "not_chest",
               "something nobody foresaw": "other"}
    with sqlite3.connect(db) as c:
        for n, reason in enumerate(reasons):
            c.execute("insert into image_results (study_uid, study_version, sop_instance_uid, analysed, reason, "
                      "created_at) values (?, 1, ?, 0, ?, '2026-12-01 00:00:00')", ("1.2.3", f"1.2.3.{n}", reason))
        c.execute("insert into image_results (study_uid, study_version, sop_instance_uid, analysed, created_at) "
                  "values ('1.2.3', 1, '1.2.3.99', 1, '2026-12-01 00:00:00')")
    cli("db", "upgrade", config=cfg)
    with sqlite3.connect(db) as c:
        got = dict(c.execute("select reason, refusal_code from image_results where analysed = 0"))
        analysed = c.execute("select refusal_code from image_results where analysed = 1").fetchone()
    assert got == reasons and analysed == (None,)
