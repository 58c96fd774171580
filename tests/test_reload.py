"""Configuration reload without a restart (issue 22): SIGHUP makes the running daemon read its
config file again. Real daemon, real storescu/echoscu, Orthanc as the PACS."""

from __future__ import annotations

import json
import signal

from conftest import cli, echoscu, free_port, storescu, wait_until
from dicomgen import make_cr, uid
from helpers_model import bundled_or_tiny


def _hup(node, count: int, event: str = "config.reloaded"):
    node.proc.send_signal(signal.SIGHUP)
    return wait_until(lambda: (lambda r: r if len(r) >= count else None)(node.events(event)), 30,
                      f"{event} #{count}", node)[-1]


def _status(node) -> dict:
    return json.loads(cli("status", "--format", "json", config=node.config).stdout)


def test_sighup_adds_a_destination_and_dead_letters_then_resend_reach_orthanc(node_factory, orthanc_factory, tmp_path):
    orthanc = orthanc_factory().start()
    ckpt = bundled_or_tiny(tmp_path / "model")
    node = node_factory("hup", quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n[outbox]\npoll_seconds = 0.5\n')).start()
    study = uid()
    assert storescu(node.port, make_cr(tmp_path / "f.dcm", study_uid=study, rows=512, cols=512)).returncode == 0
    node.wait_for_event("study.processed", study_uid=study, timeout=180)

    # the admin adds the PACS to the file; the daemon does not know it yet
    dest = (f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f"port = {orthanc.dicom_port}\n")
    node.config.write_text(node.config.read_text() + dest)
    st = _status(node)
    assert st["destinations"] == [] and st["destinations_source"] == "running daemon"
    assert any("differs from what the running daemon uses" in w for w in st["warnings"])
    cli("resend", study, config=node.config)  # queued for "pacs", which the daemon does not know: dead letters
    dead = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(node.events("outbox.dead", study_uid=study)),
                      30, "two dead letters", node)
    assert all("not in the running daemon's [[destinations]]" in r["reason"] for r in dead)
    assert not orthanc.find(StudyInstanceUID=study)

    row = _hup(node, 1)
    assert row["detail"]["changed"]["[[destinations]]"] == {"added": ["pacs"]}
    assert row["detail"]["kept_until_restart"] == []
    assert [d["name"] for d in row["detail"]["running"]["destinations"]] == ["pacs"]
    assert node.proc.poll() is None  # SIGHUP no longer ends the daemon
    st = _status(node)
    assert st["destinations"] == ["pacs"] and not any("differs" in w for w in st["warnings"])

    # the dead letters, retried, reach the PACS; and so does a resend
    cli("outbox", "retry", "--all-dead", config=node.config)
    got = wait_until(lambda: (lambda f: f if len(f) == 2 else None)(orthanc.find(StudyInstanceUID=study)), 60,
                     "SR and SC in Orthanc after the retry", node)
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in got} == {r["sop_instance_uid"] for r in dead}
    cli("resend", study, "--to", "pacs", config=node.config)
    wait_until(lambda: len(node.events("outbox.sent", study_uid=study)) == 4, 60, "the resend sent", node)
    assert node.stop() == 0


def test_reload_allow_lists_stations_logging_and_what_needs_a_restart(node_factory, tmp_path):
    node = node_factory("hup2", quiet_seconds=60,
                        extra='[model]\npreload = false\ncheckpoint = "/nonexistent.pt"\n').start()
    assert echoscu(node.port, aet="ANYONE").returncode == 0
    text = node.config.read_text()
    port = free_port()
    text = text.replace(f"port = {node.port}", f"port = {port}")  # needs a restart: kept
    text = text.replace('drain_seconds = 20\n', 'drain_seconds = 20\nallowed_calling_aets = ["GOODMOD"]\n')
    text = text.replace('level = "INFO"', 'level = "DEBUG"')
    text += '[[stations]]\nae_title = "GOODMOD"\nname = "room-1"\nmode = "shadow"\n'
    node.config.write_text(text)
    row = _hup(node, 1)
    changed = row["detail"]["changed"]
    assert changed["[node] allowed_calling_aets"] == [[], ["GOODMOD"]]
    assert changed["[logging] level"] == ["INFO", "DEBUG"]
    assert changed["[[stations]]"] == {"added": ["room-1"]}
    assert row["detail"]["kept_until_restart"] == ["[node] port"]
    assert "[node] port changed in" in node.log and "need(s) a restart" in node.log

    # the allow-list applies to the next association; the port is still the old one
    assert echoscu(node.port, aet="ANYONE").returncode != 0
    (rej,) = node.events("association.rejected", calling_aet="ANYONE")
    assert "not in allowed_calling_aets" in rej["reason"]
    assert echoscu(node.port, aet="GOODMOD").returncode == 0
    # the new level: DEBUG records after the reload
    assert "DEBUG cxr_node.node.reload: running configuration now" in node.log
    # the station is shadow for the daemon and status
    study = uid()
    assert storescu(node.port, make_cr(tmp_path / "s.dcm", study_uid=study, rows=128, cols=128),
                    aet="GOODMOD").returncode == 0
    assert [s for s in _status(node)["running_config"]["stations"] if s["name"] == "room-1"][0]["mode"] == "shadow"

    # a file that does not validate changes nothing and says why
    node.config.write_text(text.replace('level = "DEBUG"', 'level = "LOUD"'))
    node.proc.send_signal(signal.SIGHUP)
    node.wait_log("configuration NOT reloaded, still running with the previous one")
    node.config.write_text(text)  # the CLI below reads the file too
    (failed,) = node.wait_for_event("config.reload_failed")
    assert "[logging] level: must be one of" in failed["reason"]
    assert node.proc.poll() is None
    assert echoscu(node.port, aet="ANYONE").returncode != 0  # the allow-list is still in force
    assert len(node.events("config.reloaded")) == 1
    assert node.stop() == 0
