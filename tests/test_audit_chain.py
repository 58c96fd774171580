"""Tamper-evident audit trail: rows changed, removed or inserted with the sqlite3 tool are found
by `cxr-node audit verify`, which names the first bad row; a clean trail verifies."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import cli, require_tool, storescu
from dicomgen import make_cr, uid


@pytest.fixture(scope="module")
def trail(tmp_path_factory, request):
    """A real trail: a node that received a study, then stopped."""
    from conftest import Node

    root = tmp_path_factory.mktemp("chain")
    node = Node(root / "node", quiet_seconds=0.5)
    node.start()
    try:
        study = uid()
        files = [make_cr(root / f"{i}.dcm", study_uid=study, seed=i) for i in range(3)]
        assert storescu(node.port, *files).returncode == 0
        node.wait_for_event("study.queued", study_uid=study)
    finally:
        assert node.stop() == 0
    return node, study


def _copy(node, tmp_path):
    """A copy of the node's config + database to tamper with."""
    db = tmp_path / "cxr-node.db"
    shutil.copy(node.data_dir / "cxr-node.db", db)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{db}"\n[storage]\ndata_dir = "{tmp_path}"\n')
    return db, cfg


def _sql(db, statement):
    exe = require_tool("sqlite3", "sqlite3")
    subprocess.run([exe, str(db), statement], check=True, capture_output=True, text=True, timeout=30)


def test_clean_trail_verifies(trail, tmp_path):
    node, _ = trail
    out = cli("audit", "verify", config=node.config).stdout
    assert "audit trail intact" in out
    n = int(out.split(":")[1].split()[0])
    assert n == len(node.audit()) and n >= 10


@pytest.mark.parametrize("what, statement, bad_id, words", [
    ("update", "UPDATE audit_events SET calling_aet = 'EVIL' WHERE id = 5", 5, "changed"),
    ("delete", "DELETE FROM audit_events WHERE id = 4", 5, "removed"),
    ("delete last", "DELETE FROM audit_events WHERE id = (SELECT max(id) FROM audit_events)", None, "removed"),
    ("insert", "INSERT INTO audit_events (ts, event, outcome, calling_aet) "
               "VALUES ('2026-11-23 10:00:00.000000', 'instance.stored', 'success', 'FAKE')", None, "inserted"),
    ("insert forged", "INSERT INTO audit_events (ts, event, outcome, prev_hash, hash) SELECT "
                      "'2026-11-23 10:00:00.000000', 'node.started', 'success', hash, hash FROM audit_events "
                      "WHERE id = (SELECT max(id) FROM audit_events)", None, "changed"),
])
def test_tampering_is_detected(trail, tmp_path, what, statement, bad_id, words):
    node, _ = trail
    db, cfg = _copy(node, tmp_path)
    _sql(db, statement)
    p = cli("audit", "verify", config=cfg, check=False)
    assert p.returncode == 1, f"{what} not detected: {p.stdout}"
    assert "TAMPERED" in p.stderr and words in p.stderr
    if bad_id is not None:
        assert f"row {bad_id} " in p.stderr and f"first bad row: {bad_id}" in p.stdout


def test_study_story(trail):
    node, study = trail
    out = cli("audit", "study", study, config=node.config).stdout
    lines = out.splitlines()
    assert lines[0] == f"study {study}"
    events = [line.split()[1] for line in lines[1:]]
    assert events[0] == "association.opened" and events.count("instance.stored") == 3
    assert events.index("study.complete") < events.index("study.queued")
    assert "association.released" in events
    p = cli("audit", "study", "1.2.3.999", config=node.config, check=False)
    assert p.returncode == 2 and "no audit events" in p.stderr
