"""The outbox against real peers: a revised study's SR names its predecessor and nothing is sent
twice (dcmtk storescp as the PACS); a permanent rejection dead-letters at once (a second
cxr-node that is called by the wrong AE title); admins list, retry and purge."""

from __future__ import annotations

import json
import time

import pytest
from conftest import StoreSCP, cli, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread

from cxr_node.dicom.status import PERMANENT, SENT, TRANSIENT
from cxr_node.outbox.send import classify_status


def _node(node_factory, tmp_path, name, dest_ae, dest_port, poll_seconds=0.3, **kw):
    ckpt = make_checkpoint(tmp_path / f"{name}-model.pt", input_size=64, thresholds={"COVID": 0.5})
    return node_factory(name, quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        f"[outbox]\npoll_seconds = {poll_seconds}\nretry_base_seconds = 1\nretry_max_seconds = 2\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "{dest_ae}"\nhost = "127.0.0.1"\nport = {dest_port}\n'), **kw)


def _wait_sent(node, study, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = node.events("outbox.sent", study_uid=study)
        if len(rows) >= n:
            return rows
        time.sleep(0.4)
    raise TimeoutError(f"{n} objects of {study} not sent; log:\n{node.log[-3000:]}")


def test_late_image_gets_a_new_sr_naming_the_old_one_and_nothing_twice(node_factory, tmp_path):
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = _node(node_factory, tmp_path, "late", pacs.ae_title, pacs.port).start()
        study = uid()
        a = make_cr(tmp_path / "a.dcm", study_uid=study, rows=300, cols=300, seed=1)
        assert storescu(node.port, a).returncode == 0
        first = _wait_sent(node, study, 2)  # SC(a) + SR v1
        b = make_cr(tmp_path / "b.dcm", study_uid=study, rows=300, cols=300, seed=2)
        assert storescu(node.port, b).returncode == 0
        later = _wait_sent(node, study, 4)  # + SC(b) + SR v2, and not SC(a) again
        files = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: dcmread(p, stop_before_pixels=True)
                 for p in pacs.out_dir.iterdir()}
    assert len(later) == 4 and len({r["sop_instance_uid"] for r in later}) == 4
    srs = [ds for ds in files.values() if ds.Modality == "SR"]
    assert len(srs) == 2
    v1 = next(ds for ds in srs if ds.SOPInstanceUID in {r["sop_instance_uid"] for r in first})
    v2 = next(ds for ds in srs if ds is not v1)
    pred = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == v1.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in v1
    (reopened,) = node.events("study.reopened", study_uid=study)
    assert reopened["detail"]["version"] == 2


def test_results_are_handed_to_the_outbox_at_once_not_at_its_next_poll(node_factory, tmp_path):
    """The outbox polls only every 10 minutes here; the worker wakes it when results are queued."""
    import datetime as dt

    with StoreSCP(tmp_path / "pacs") as pacs:
        node = _node(node_factory, tmp_path, "wake", pacs.ae_title, pacs.port, poll_seconds=600).start()
        time.sleep(1)  # past the outbox's first run at start-up
        study = uid()
        assert storescu(node.port, make_cr(tmp_path / "w.dcm", study_uid=study, rows=128, cols=128)).returncode == 0
        sent = _wait_sent(node, study, 2, timeout=60)
        (done,) = node.events("study.processed", study_uid=study)
        t = lambda r: dt.datetime.fromisoformat(r["time"])  # noqa: E731
        assert max(t(r) for r in sent) - t(done) < dt.timedelta(seconds=5)


def test_permanent_rejection_dead_letters_and_admin_cli(node_factory, tmp_path):
    other = node_factory("other", ae_title="OTHERNODE").start()  # refuses any other called AE title
    node = _node(node_factory, tmp_path, "sender", "WRONGAE", other.port).start()
    study = uid()
    assert storescu(node.port, make_cr(tmp_path / "x.dcm", study_uid=study, rows=300, cols=300)).returncode == 0
    dead = node.wait_for_event("outbox.dead", study_uid=study, timeout=120)
    deadline = time.monotonic() + 30
    while len(dead) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
        dead = node.events("outbox.dead", study_uid=study)
    assert len(dead) == 2 and all("rejected the association" in r["reason"] for r in dead)
    assert all(r["detail"]["attempt"] == 1 for r in dead)  # at once, no retries
    assert not node.events("outbox.retry", study_uid=study)
    assert other.events("association.rejected")  # the peer really refused it

    status = json.loads(cli("status", "--format", "json", config=node.config).stdout)
    assert status["running"] and status["uptime_seconds"] >= 0
    assert status["outbox"]["dead"] == 2 and status["outbox"]["pending"] == 0
    assert status["studies"] == {"processed": 1}
    assert any(e["event"] == "outbox.dead" and "rejected" in e["reason"] for e in status["last_errors"])
    assert status["model"]["last_used_version"] == "test-densenet121-64"
    text = cli("status", config=node.config).stdout
    assert "daemon      running" in text and "dead 2" in text

    listed = json.loads(cli("outbox", "list", "--state", "dead", "--format", "json", config=node.config).stdout)
    assert len(listed) == 2 and {r["kind"] for r in listed} == {"sc", "sr"}
    assert all("Called AE Title Not Recognized" in r["last_error"] or "rejected" in r["last_error"] for r in listed)
    table = cli("outbox", "list", config=node.config).stdout
    assert "dead" in table and "(2 items)" in table

    assert "2 item(s) pending again" in cli("outbox", "retry", "--all-dead", config=node.config).stdout
    deadline = time.monotonic() + 60
    while len(node.events("outbox.dead", study_uid=study)) < 4 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(node.events("outbox.requeued", study_uid=study)) == 2
    assert len(node.events("outbox.dead", study_uid=study)) == 4  # tried again, refused again

    files = [node.data_dir / "outbox" / r["study_uid"] / f"{r['sop_instance_uid']}.dcm" for r in listed]
    assert all(f.is_file() for f in files)
    p = cli("outbox", "purge", config=node.config, check=False)
    assert p.returncode == 2 and "--sent and/or --dead" in p.stderr
    assert "2 item(s) purged" in cli("outbox", "purge", "--dead", config=node.config).stdout
    assert not any(f.exists() for f in files)
    assert json.loads(cli("outbox", "list", "--format", "json", config=node.config).stdout) == []


@pytest.mark.parametrize("status, kind", [
    (0x0000, SENT), (0xB000, SENT), (0xB007, SENT), (0xA700, TRANSIENT), (0xA7FF, TRANSIENT),
    (0xA900, PERMANENT), (0xC000, PERMANENT), (0xC123, PERMANENT), (0x0122, PERMANENT), (0x0211, TRANSIENT),
    (0x0111, SENT),
])
def test_status_classification(status, kind):
    assert classify_status(status).kind == kind


def test_a_destination_that_already_holds_the_object_is_not_retried(node_factory, tmp_path):
    """A pynetdicom Storage SCP that answers 0x0111 (duplicate SOP Instance) to every C-STORE: each result is
    recorded sent with the status and why, at the first attempt, and never retried."""
    from conftest import free_port
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    seen: list[str] = []

    def duplicate(event):
        seen.append(event.request.AffectedSOPInstanceUID)
        return 0x0111

    ae = AE(ae_title="DUPPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, duplicate)])
    try:
        node = _node(node_factory, tmp_path, "dup", "DUPPACS", port).start()
        study = uid()
        assert storescu(node.port, make_cr(tmp_path / "d.dcm", study_uid=study, rows=128, cols=128)).returncode == 0
        sent = _wait_sent(node, study, 2, timeout=60)
        time.sleep(3)  # three retry periods (retry_base_seconds 1): a retry would show by now
    finally:
        server.shutdown()
    assert all(r["status"] == 0x0111 and "already holds" in r["reason"] for r in sent)
    assert all(r["detail"]["attempt"] == 1 for r in sent)
    assert not node.events("outbox.retry", study_uid=study)
    assert sorted(seen) == sorted(r["sop_instance_uid"] for r in sent)  # each offered once
    listed = json.loads(cli("outbox", "list", "--format", "json", config=node.config).stdout)
    assert {r["state"] for r in listed} == {"sent"} and {r["last_status"] for r in listed} == {0x0111}


def test_prometheus_metrics(node_factory, tmp_path):
    import urllib.request

    from conftest import echoscu, free_port

    port = free_port()
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = _node(node_factory, tmp_path, "metrics", pacs.ae_title, pacs.port)
        node.config.write_text(node.config.read_text() + f"[metrics]\nport = {port}\n")
        node.start()
        study = uid()
        assert storescu(node.port, make_cr(tmp_path / "m.dcm", study_uid=study, rows=300, cols=300)).returncode == 0
        assert echoscu(node.port, aec="NOTME").returncode != 0
        _wait_sent(node, study, 2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['cxr_node_instances_total{outcome="stored"}'] == 1
    assert values['cxr_node_associations_total{outcome="accepted"}'] >= 1
    assert values['cxr_node_associations_total{outcome="rejected"}'] == 1
    assert values["cxr_node_received_bytes_total"] > 180_000
    assert values['cxr_node_studies{state="processed"}'] == 1
    assert values['cxr_node_outbox_items{state="sent"}'] == 2
    assert values["cxr_node_inference_seconds_count"] == 1
