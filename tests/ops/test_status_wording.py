"""What `cxr-node status` says (issue 22): dead letters sent later are no longer "last errors",
shadow-mode results are described as kept because of shadow mode (not as something `resend`
should fix), and stations seen but not configured are listed. Real daemon, storescu and Orthanc."""

from __future__ import annotations

import json

from conftest import cli, storescu, wait_until
from dicomgen import make_cr, uid
from helpers_model import bundled_or_tiny


def test_status_after_dead_letters_are_sent_with_a_shadow_station_and_an_unlisted_one(
        node_factory, orthanc_factory, tmp_path):
    orthanc = orthanc_factory()  # not started yet: the PACS is down
    ckpt = bundled_or_tiny(tmp_path / "model")
    node = node_factory("st", quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.5\nmax_attempts = 1\nretry_base_seconds = 0.5\n"
        '[[stations]]\nae_title = "ROOM_S"\nname = "shadow-room"\nmode = "shadow"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    )).start()
    active, shadow = uid(), uid()
    assert storescu(node.port, make_cr(tmp_path / "a.dcm", study_uid=active, rows=512, cols=512),
                    aet="ROOM_A").returncode == 0
    assert storescu(node.port, make_cr(tmp_path / "s.dcm", study_uid=shadow, rows=512, cols=512),
                    aet="ROOM_S").returncode == 0
    wait_until(lambda: len(node.events("outbox.dead", study_uid=active)) == 2, 180, "dead letters", node)
    node.wait_for_event("study.shadow", study_uid=shadow, timeout=120)

    st = json.loads(cli("status", "--format", "json", config=node.config).stdout)
    assert [e["event"] for e in st["last_errors"]].count("outbox.dead") == 2
    assert st["results_kept_shadow"] == 1 and st["results_never_queued"] == 0
    assert st["stations_not_configured"] == ["ROOM_A"]

    orthanc.start()
    cli("outbox", "retry", "--all-dead", config=node.config)
    wait_until(lambda: len(node.events("outbox.sent", study_uid=active)) == 2, 60, "sent after the retry", node)
    st = json.loads(cli("status", "--format", "json", config=node.config).stdout)
    assert not [e for e in st["last_errors"] if e["event"] in ("outbox.dead", "outbox.retry")]

    table = cli("status", config=node.config).stdout
    assert "1 study analysed in shadow mode: results kept, not sent, because the station is in shadow mode" in table
    assert "never queued" not in table
    assert "unlisted    ROOM_A: seen but not in [[stations]]" in table and "station_name / institution_name" in table
    assert "send to     pacs  (running daemon)" in table
    # a single node on SQLite has its lease too: live, holding nothing once its work is done
    (me,) = st["nodes"]
    assert me["state"] == "live" and me["pid"] == node.proc.pid and me["studies"] == me["outbox"] == 0
    assert f"node        {me['node']} (pid {node.proc.pid}, since " in table
    assert ": live, heartbeat " in table and "holds 0 studies, 0 outbox item(s)" in table
