"""Tamper-evident audit trail: rows changed, removed or inserted with the sqlite3 tool are found
by `cxr-node audit verify`, which names the first bad row; a clean trail verifies."""

from __future__ import annotations

import json
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
    assert "{" not in out and "URGENT" not in out  # sentences, not JSON; a priority said once
    p = cli("audit", "study", "1.2.3.999", config=node.config, check=False)
    assert p.returncode == 2 and "no audit events" in p.stderr


def test_audit_backlog_replays_in_order_keeps_times_and_survives_a_failed_try(tmp_path):
    """Events kept on disk while the database is down: a failed replay keeps them, a torn last line
    (a crash mid-append) is skipped, and the replay writes them into the chain with their own times."""
    import datetime as dt

    from sqlalchemy.exc import SQLAlchemyError

    from cxr_node.audit.trail import verify_chain
    from cxr_node.audit.backlog import AuditBacklog
    from cxr_node.db.migrate import upgrade
    from cxr_node.db.models import AuditEvent
    from cxr_node.db.session import Database

    backlog = AuditBacklog(tmp_path / "audit-backlog" / "node.jsonl")
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert backlog.add("echo.received", "success", {"calling_aet": "MOD", "status": 0}, t0)
    assert backlog.add("instance.failed", "failure", {"status": 0xA700, "reason": "database unavailable",
                                                      "detail": {"k": 1}}, t0 + dt.timedelta(seconds=1))
    with open(backlog.path, "a") as f:
        f.write('{"event":"echo.rec')  # torn
    assert oct(backlog.path.stat().st_mode & 0o777) == "0o600" and backlog.pending() == 3

    down = Database(f"sqlite:///{tmp_path / 'no-schema.db'}")  # every insert fails: no tables
    with pytest.raises(SQLAlchemyError):
        backlog.replay(down)
    assert backlog.pending() == 3  # nothing lost; waiting in the .replaying file
    assert backlog.add("echo.received", "success", {"calling_aet": "LATE"})  # new failures go to a new file

    url = f"sqlite:///{tmp_path / 'ok.db'}"
    upgrade(url)
    db = Database(url)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n[storage]\ndata_dir = "{tmp_path}"\n')
    assert json.loads(cli("status", "--format", "json", config=cfg).stdout)["audit_backlog"] == 4
    assert "4 event(s) kept on disk" in cli("status", config=cfg).stdout
    assert backlog.replay(db) == 2  # the .replaying file first
    assert backlog.replay(db) == 1  # then the newer one
    assert backlog.pending() == 0 and not list(backlog.path.parent.iterdir())
    with db.session() as s:
        rows = list(s.query(AuditEvent).order_by(AuditEvent.id))
        assert [r.event for r in rows] == ["echo.received", "instance.failed", "echo.received"]
        assert rows[0].ts.replace(tzinfo=dt.timezone.utc) == t0 and rows[1].status == 0xA700
        assert rows[1].detail == {"k": 1, "audit_backlog": True} and rows[2].calling_aet == "LATE"
        assert verify_chain(s).ok
    assert json.loads(cli("status", "--format", "json", config=cfg).stdout)["audit_backlog"] == 0
