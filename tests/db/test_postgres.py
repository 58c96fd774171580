"""PostgreSQL as the database: migrations, the audit trail and its hash chain, and two cxr-node
processes sharing one database (and data_dir) never processing the same study twice."""

from __future__ import annotations

import json
import time

from conftest import cli, echoscu, scu_store, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint


def test_migrations_on_postgres(postgres, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl = "{postgres.url}"\n[storage]\ndata_dir = "{tmp_path}"\n')
    cli("db", "upgrade", config=cfg)
    tables = set(postgres.psql("select tablename from pg_tables where schemaname='public'").split())
    assert {"audit_events", "studies", "instances", "outbox", "image_results", "audit_chain_head"} <= tables
    cli("db", "downgrade", "base", config=cfg)
    assert "audit_events" not in postgres.psql("select tablename from pg_tables where schemaname='public'")
    cli("db", "upgrade", config=cfg)


def test_two_nodes_share_postgres_and_process_each_study_once(postgres, node_factory, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", input_size=64)
    shared = tmp_path / "shared-data"
    extra = f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
    a = node_factory("a", quiet_seconds=0.5, db_url=postgres.url, extra=extra)
    b = node_factory("b", quiet_seconds=0.5, db_url=postgres.url, extra=extra)
    for n in (a, b):  # one shared spool, as nodes behind one address would have
        n.data_dir = shared
        n.config.write_text(n.config.read_text().replace(str(n.root / "data"), str(shared)))
    a.start()
    b.start(upgrade=False)
    studies = [uid() for _ in range(6)]
    for i, study in enumerate(studies):  # each study's two films arrive at both nodes
        f1 = make_cr(tmp_path / f"{i}-1.dcm", study_uid=study, rows=128, cols=128, seed=i)
        f2 = make_cr(tmp_path / f"{i}-2.dcm", study_uid=study, rows=128, cols=128, seed=100 + i)
        assert storescu(a.port, f1).returncode == 0
        assert storescu(b.port, f2).returncode == 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        done = {r["study_uid"] for r in a.events("study.processed")}
        if done >= set(studies):
            break
        time.sleep(0.5)
    assert set(studies) <= {r["study_uid"] for r in a.events("study.processed")}, a.log[-3000:] + b.log[-3000:]
    triaged = a.events("image.triaged")
    per_film = {}
    for r in triaged:
        per_film[(r["sop_instance_uid"], r["detail"]["version"])] = per_film.get(
            (r["sop_instance_uid"], r["detail"]["version"]), 0) + 1
    assert per_film and max(per_film.values()) == 1, "a film was analysed twice for the same study version"
    claims = a.events("study.processing")
    assert len({(r["study_uid"], r["detail"]["version"]) for r in claims}) == len(claims)  # one claim each
    assert out_ok(a)


def out_ok(node) -> bool:
    p = cli("audit", "verify", config=node.config, check=False)
    assert p.returncode == 0, p.stderr
    return "intact" in p.stdout


def test_audit_tampering_detected_on_postgres(postgres, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl = "{postgres.url}"\n[storage]\ndata_dir = "{tmp_path}"\n')
    cli("db", "upgrade", config=cfg)
    assert cli("audit", "verify", config=cfg).returncode == 0
    n = int(postgres.psql("select count(*) from audit_events"))
    assert n > 0  # rows from the tests before
    first = int(postgres.psql("select min(id) from audit_events"))
    postgres.psql(f"update audit_events set calling_aet = 'EVIL' where id = {first}")
    p = cli("audit", "verify", config=cfg, check=False)
    assert p.returncode == 1 and f"row {first} " in p.stderr and "changed" in p.stderr


def test_database_outage_gets_a700_and_the_node_recovers(postgres, node_factory, tmp_path):
    """PostgreSQL stops under a running node: a store gets 0xA700 with a reason and leaves nothing in
    the spool, the node keeps answering (and logs no patient name), and once the database is back
    the same film is stored, audited and its study completes, on the same process."""
    from pydicom import dcmread

    n = node_factory("outage", quiet_seconds=0.5, db_url=postgres.new_database("outage")).start()
    secret = "Outage^Zebediah"
    before = make_cr(tmp_path / "before.dcm", rows=128, cols=128, patient_name=secret, seed=1)
    during = make_cr(tmp_path / "during.dcm", rows=128, cols=128, patient_name=secret, seed=2,
                     study_uid=dcmread(before).StudyInstanceUID)
    assert scu_store(n.port, before).Status == 0x0000
    postgres.halt()
    try:
        rsp = scu_store(n.port, during)
        assert rsp.Status == 0xA700 and "database unavailable" in rsp.ErrorComment
        sop = dcmread(during).SOPInstanceUID
        assert not [p for p in n.data_dir.rglob("*") if p.is_file() and sop in p.name]  # nothing half-kept
        assert echoscu(n.port).returncode == 0  # still serving during the outage
        # an admin asks during the outage: the database is named unreachable, the kept events counted
        st = cli("status", "--format", "json", config=n.config, check=False)
        assert st.returncode == 1, st.stderr
        doc = json.loads(st.stdout)
        assert doc["database"] == "unreachable" and "Connection refused" in doc["error"]
        assert doc["audit_backlog"] >= 3  # at least: the failed store, the echo, an association event
        time.sleep(2)  # the scheduler's jobs run against the dead database for a few ticks
        assert n.proc.poll() is None
    finally:
        postgres.resume()
    assert scu_store(n.port, during).Status == 0x0000  # a fresh connection, same process
    assert n.proc.poll() is None
    stored = {r["sop_instance_uid"] for r in n.events("instance.stored")}
    assert {dcmread(before).SOPInstanceUID, sop} <= stored
    study = dcmread(before).StudyInstanceUID
    assert n.wait_for_event("study.complete", timeout=60, study_uid=study), n.log[-3000:]
    # what happened during the outage reached the audit trail late, from the on-disk backlog
    (failed,) = n.wait_for_event("instance.failed", timeout=30, sop_instance_uid=sop)
    assert failed["status"] == 0xA700 and failed["detail"]["audit_backlog"] is True
    assert "database unavailable" in failed["reason"]
    echoes = [r for r in n.events("echo.received") if (r["detail"] or {}).get("audit_backlog")]
    (stored_later,) = n.events("instance.stored", sop_instance_uid=sop)
    assert len(echoes) == 1 and failed["time"] < echoes[0]["time"] < stored_later["time"]  # original times kept
    assert not list((n.data_dir / "audit-backlog").glob("*.jsonl*"))  # replayed and removed
    assert "intact" in cli("audit", "verify", config=n.config).stdout
    log = n.log
    assert "0xA700: database unavailable" in log and "Connection refused" in log
    assert "Background on this error" not in log  # one line per error, not SQLAlchemy's footer
    # one ERROR per job per outage, then one WARNING when the database is back (not one per tick)
    assert log.count("study completion check failed on the database") == 1
    assert "study completion check: database reachable again" in log
    assert secret not in log and "Zebediah" not in log
