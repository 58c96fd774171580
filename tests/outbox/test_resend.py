"""`cxr-node resend` and `cxr-node reprocess` against the real daemon and dcmtk storescp as the PACS.

Results made while no destination was configured are kept and delivered later by `resend`; a
reprocessed study gets a new SR that names the previous one, and its Secondary Captures are not
sent twice."""

from __future__ import annotations

import json
import time

import pytest
from conftest import StoreSCP, cli, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread


def _config_extra(tmp_path, name: str, dest: StoreSCP | None) -> str:
    ckpt = tmp_path / f"{name}-model.pt"
    if not ckpt.exists():
        make_checkpoint(ckpt, input_size=64)
    extra = (f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
             "[outbox]\npoll_seconds = 0.3\nretry_base_seconds = 1\nretry_max_seconds = 2\n")
    if dest is not None:
        extra += (f'[[destinations]]\nname = "pacs"\nae_title = "{dest.ae_title}"\nhost = "127.0.0.1"\n'
                  f"port = {dest.port}\n")
    return extra


def _wait_events(node, event: str, study: str, n: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = node.events(event, study_uid=study)
        if len(rows) >= n:
            return rows
        time.sleep(0.3)
    raise TimeoutError(f"{n} x {event} for {study} not seen; log:\n{node.log[-3000:]}")


def _received(scp: StoreSCP) -> dict[str, object]:
    return {ds.SOPInstanceUID: ds for ds in (dcmread(p, stop_before_pixels=True) for p in scp.out_dir.iterdir())}


def test_results_made_without_a_destination_are_kept_and_resent_later(node_factory, tmp_path):
    node = node_factory("nodest", quiet_seconds=1, extra=_config_extra(tmp_path, "nodest", None)).start()
    study = uid()
    assert storescu(node.port, make_cr(tmp_path / "a.dcm", study_uid=study, rows=128, cols=128)).returncode == 0
    _wait_events(node, "study.processed", study, 1)

    # the admin is told, in check-config and status, and the results are on disk, not queued
    p = cli("check-config", config=node.config)
    assert "warning: no [[destinations]] configured" in p.stderr and "destination none" in p.stdout
    st = json.loads(cli("status", "--format", "json", config=node.config).stdout)
    assert st["destinations"] == [] and st["results_never_queued"] == 1
    assert any("no [[destinations]]" in w for w in st["warnings"])
    assert "send to     NONE" in cli("status", config=node.config).stdout
    kept = sorted((node.data_dir / "outbox" / study).glob("*.dcm"))
    assert len(kept) == 2  # the SC and the SR
    assert json.loads(cli("outbox", "list", "--format", "json", config=node.config).stdout) == []
    p = cli("resend", study, config=node.config, check=False)
    assert p.returncode == 2 and "no [[destinations]] configured" in p.stderr

    # the PACS is configured later: the daemon restarts with it, then resend delivers what was kept
    with StoreSCP(tmp_path / "pacs") as pacs:
        node.stop()
        node.config.write_text(node.config.read_text().replace(_config_extra(tmp_path, "nodest", None),
                                                               _config_extra(tmp_path, "nodest", pacs)))
        node.start()
        assert "destination none" not in cli("check-config", config=node.config).stdout
        p = cli("resend", study, "--config", str(node.config))  # the option after the command
        assert f"{study}: 2 result object(s) for pacs: 2 queued, 0 sent again" in p.stdout
        sent = _wait_events(node, "outbox.sent", study, 2)
        got = _received(pacs)
        assert {r["sop_instance_uid"] for r in sent} == {dcmread(f).SOPInstanceUID for f in kept} == set(got)
        assert sorted(ds.SOPClassUID.name for ds in got.values()) == [
            "Comprehensive SR Storage", "Secondary Capture Image Storage"]
        (ev,) = node.events("outbox.resend", study_uid=study)
        assert ev["detail"]["queued"] == 2 and ev["detail"]["destinations"] == ["pacs"]
        assert "resend to pacs: 2 queued, 0 sent again" in cli("audit", "study", study, config=node.config).stdout
        assert json.loads(cli("status", "--format", "json", config=node.config).stdout)["results_never_queued"] == 0

        # again, to the named destination (the PACS lost them): the sent items go out once more
        p = cli("resend", study, "--to", "pacs", config=node.config)
        assert "0 queued, 2 sent again" in p.stdout
        assert len(_wait_events(node, "outbox.sent", study, 4)) == 4
        assert len(node.events("outbox.requeued", study_uid=study)) == 2

    unknown = cli("resend", "1.2.3.999", config=node.config, check=False)
    assert unknown.returncode == 1 and "study 1.2.3.999: not known to this node" in unknown.stderr
    bad = cli("resend", study, "--to", "nope", config=node.config, check=False)
    assert bad.returncode == 2 and "no destination named 'nope'" in bad.stderr
    assert len(node.events("outbox.resend", study_uid=study)) == 2  # refusals change nothing


def test_reprocess_makes_a_new_sr_naming_the_previous_one(node_factory, tmp_path):
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = node_factory("again", quiet_seconds=1, extra=_config_extra(tmp_path, "again", pacs)).start()
        study = uid()
        assert storescu(node.port, make_cr(tmp_path / "a.dcm", study_uid=study, rows=128, cols=128)).returncode == 0
        first = _wait_events(node, "outbox.sent", study, 2)  # SC + SR v1

        p = cli("reprocess", study, config=node.config)
        assert f"{study}: queued for analysis as version 2" in p.stdout
        later = _wait_events(node, "outbox.sent", study, 3)  # + SR v2; the SC is the same object, not sent twice
        got = _received(pacs)
        (ev,) = node.events("study.reprocess", study_uid=study)
        assert ev["detail"]["from"] == "processed" and ev["detail"]["version"] == 2
        story = cli("audit", "study", study, config=node.config).stdout
        assert "study.reprocess" in story and "queued for analysis again as version 2 (was processed)" in story

        # --since finds the (processed) study again: version 3 names version 2
        p = cli("reprocess", "--since", "2000-01-01", config=node.config)
        assert f"{study}: queued for analysis as version 3" in p.stdout
        _wait_events(node, "outbox.sent", study, 4)
        got = _received(pacs)
    srs = [ds for ds in got.values() if ds.Modality == "SR"]
    assert len(srs) == 3 and len(got) == 4  # 1 SC + SR v1, v2, v3
    assert len(later) == 3 and len({r["sop_instance_uid"] for r in later}) == 3
    v1 = next(ds for ds in srs if ds.SOPInstanceUID in {r["sop_instance_uid"] for r in first})
    by_pred = {ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
               .ReferencedSOPInstanceUID: ds for ds in srs if "PredecessorDocumentsSequence" in ds}
    v2 = by_pred[v1.SOPInstanceUID]  # v2 names v1
    assert v2.SOPInstanceUID in by_pred  # and v3 names v2
    assert "PredecessorDocumentsSequence" not in v1
    processed = node.events("study.processed", study_uid=study)
    assert [r["detail"]["version"] for r in processed] == [1, 2, 3]

    p = cli("reprocess", "1.2.3.999", config=node.config, check=False)
    assert p.returncode == 1 and "not known to this node" in p.stderr
    p = cli("reprocess", config=node.config, check=False)
    assert p.returncode == 2 and "give STUDY_UIDs or --since" in p.stderr
    assert "no processed or failed study" in cli("reprocess", "--since", "2999-01-01", config=node.config).stdout


def test_reprocess_refuses_a_study_on_its_way(tmp_path):
    """In process, on a real database: a study still receiving (or queued, processing) is not
    queued again, and one whose films retention removed cannot be analysed."""
    import datetime as dt

    from cxr_node import config
    from cxr_node.audit import trail as audit
    from cxr_node.db import migrate
    from cxr_node.db.models import Instance, Study, utcnow
    from cxr_node.db.session import Database
    from cxr_node.errors import CxrNodeError
    from cxr_node.study.states import reprocess as requeue

    settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    now = utcnow()
    with db.transaction() as s:
        for study_uid, state in (("1.2.3.1", "receiving"), ("1.2.3.2", "processing"), ("1.2.3.3", "processed")):
            s.add(Study(study_uid=study_uid, state=state, version=1, instance_count=1, first_received_at=now,
                        last_received_at=now, state_changed_at=now))
        s.add(Instance(sop_instance_uid="1.2.3.3.1", study_uid="1.2.3.3", series_uid="1.2.3.3.0",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
                       path="x.dcm", bytes=1, triage_eligible=True, study_version=1, received_at=now,
                       removed_at=now - dt.timedelta(days=1)))
        audit.record(s, "node.started")
    for study_uid, why in (("1.2.3.1", "is receiving"), ("1.2.3.2", "is processing"),
                           ("1.2.3.3", "films are no longer in the spool")):
        with pytest.raises(CxrNodeError, match=why):
            requeue(db, study_uid)
    with db.session() as s:
        assert [st.version for st in s.query(Study).order_by(Study.study_uid)] == [1, 1, 1]
    db.dispose()
