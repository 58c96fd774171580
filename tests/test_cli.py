"""The CLI around the daemon: help, echo to a real peer, audit queries in three formats, systemd."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess

import pytest

from conftest import REPO, StoreSCP, cli, free_port, storescu
from cxr_node.audit import FIELDS
from dicomgen import make_cr


def test_help_lists_every_command():
    out = cli("--help").stdout
    for cmd in ("serve", "db", "check-config", "echo", "audit", "triage"):
        assert cmd in out
    assert "usage: cxr-node" in cli("audit", "--help").stdout


def test_echo_to_a_real_peer_and_failures(tmp_path):
    closed = free_port()
    with StoreSCP(tmp_path / "scp") as scp:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\ndata_dir = "{tmp_path}"\n'
                       f'[[destinations]]\nname = "pacs"\nae_title = "{scp.ae_title}"\nhost = "127.0.0.1"\nport = {scp.port}\n'
                       f'[[destinations]]\nname = "down"\nae_title = "X"\nhost = "127.0.0.1"\nport = {closed}\n')
        ok = cli("echo", "--to", "pacs", config=cfg)
        assert "status 0x0000 Success" in ok.stdout
    down = cli("echo", "--to", "down", "--timeout", "3", config=cfg, check=False)
    assert down.returncode == 1 and "could not associate with down" in down.stderr
    unknown = cli("echo", "--to", "nope", config=cfg, check=False)
    assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr


def test_audit_filters_and_formats(node_factory, tmp_path):
    n = node_factory("aud").start()
    a, b = make_cr(tmp_path / "a.dcm"), make_cr(tmp_path / "b.dcm")
    assert storescu(n.port, a, aet="MOD_A").returncode == 0
    assert storescu(n.port, b, aet="MOD_B").returncode == 0
    from pydicom import dcmread

    study_a = dcmread(a).StudyInstanceUID
    rows = n.audit()
    assert rows and all(list(r) == list(FIELDS) for r in rows)  # stable field names, in order
    stored = n.audit("--event", "instance.stored")
    assert {r["calling_aet"] for r in stored} == {"MOD_A", "MOD_B"}
    assert {r["patient_id"] for r in n.audit("--patient-id", "PID-TEST")} == {"PID-TEST"}
    assert n.audit("--patient-id", "NOBODY") == []
    assert n.audit("--outcome", "failure") == [] and len(n.audit("--outcome", "success")) == len(rows)
    page1, page2 = n.audit("--limit", "3"), n.audit("--limit", "3", "--offset", "3")
    assert [r["id"] for r in page1 + page2] == [r["id"] for r in rows[:6]]
    only_a = n.audit("--calling-aet", "MOD_A", "--event", "instance.stored")
    assert [r["study_uid"] for r in only_a] == [study_a]
    by_study = n.audit("--study", study_a)
    assert by_study and all(r["study_uid"] == study_a for r in by_study)
    assert n.audit("--since", "2999-01-01") == []
    assert len(n.audit("--until", "2999-01-01T00:00:00Z")) == len(n.audit())
    assert len(n.audit("--limit", "2")) == 2

    out = cli("audit", "--format", "csv", "--event", "instance.stored", config=n.config).stdout
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert list(parsed[0]) == list(FIELDS) and len(parsed) == 2
    table = cli("audit", "--event", "instance.stored", config=n.config).stdout
    assert table.splitlines()[0].startswith("TIME") and "(2 events)" in table

    # PS3.15 A.5 DICOM Audit Messages, one XML document per line
    import xml.etree.ElementTree as ET

    p = cli("audit", "export", "--format", "dicom-audit", config=n.config)
    msgs = [ET.fromstring(line) for line in p.stdout.splitlines()]
    assert "DICOM audit message(s)" in p.stderr and msgs
    transfers = [m for m in msgs if m.find("EventIdentification/EventID").get("csd-code") == "110104"]
    assert len(transfers) == 2  # the two stored instances
    for m in transfers:
        ev = m.find("EventIdentification")
        assert ev.get("EventActionCode") == "C" and ev.get("EventOutcomeIndicator") == "0"
        roles = {ap.find("RoleIDCode").get("csd-code"): ap.get("UserID") for ap in m.findall("ActiveParticipant")}
        assert roles["110152"] == "CXRNODE" and roles["110153"] in ("MOD_A", "MOD_B")
        ids = {po.find("ParticipantObjectIDTypeCode").get("csd-code"): po.get("ParticipantObjectID")
               for po in m.findall("ParticipantObjectIdentification")}
        assert ids["2"] == "PID-TEST" and ids["110180"]
        assert m.find("AuditSourceIdentification").get("AuditSourceID") == "cxr-node"
    starts = [m for m in msgs if m.find("EventIdentification/EventTypeCode") is not None
              and m.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"]
    assert len(starts) == 1

    bad = cli("audit", "--since", "yesterday", config=n.config, check=False)
    assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr
    bad = cli("audit", "--event", "instance.eaten", config=n.config, check=False)
    assert bad.returncode == 2 and "unknown event type" in bad.stderr
    assert "instance.stored" in cli("audit", "--event", "list", config=n.config).stdout


def test_systemd_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not found (Debian package systemd)")
    unit = (REPO / "systemd" / "cxr-node.service").read_text()
    for needed in ("User=cxr-node", "Restart=on-failure", "ExecStartPre=", "db upgrade", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ReadWritePaths=/var/lib/cxr-node", "PrivateTmp=yes", "ProtectHome=yes"):
        assert needed in unit
    # verify checks that ExecStart exists: point it at this checkout's console script
    local = tmp_path / "cxr-node.service"
    local.write_text(unit.replace("/opt/cxr-node/.venv/bin/cxr-node", str(REPO / ".venv" / "bin" / "cxr-node")))
    p = subprocess.run([exe, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "cxr-node.service" not in p.stderr, p.stderr  # no warnings about our unit
    sec = subprocess.run([exe, "security", "--offline=true", str(local)], capture_output=True, text=True, timeout=60)
    if sec.returncode == 0 or "Overall exposure level" in sec.stdout:
        exposure = float(sec.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
        assert exposure <= 4.0, sec.stdout[-2000:]  # 3.2 "OK" when written (systemd/SECURITY.md)


def test_data_is_owner_only(node_factory, tmp_path):
    import stat

    n = node_factory("perm").start()
    assert storescu(n.port, make_cr(tmp_path / "p.dcm")).returncode == 0
    n.stop()
    for p in [n.data_dir / "cxr-node.db", n.data_dir / "spool", n.data_dir / "incoming", n.data_dir / "outbox",
              *[f for f in (n.data_dir / "spool").rglob("*")]]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
