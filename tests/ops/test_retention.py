"""Retention removes old films and sent result files, and never anything of a study whose results
are not yet sent (or were dead-lettered)."""

from __future__ import annotations

import time

from conftest import StoreSCP, cli, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread


def test_retention_never_deletes_an_unsent_result(node_factory, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", input_size=64)
    scp = StoreSCP(tmp_path / "pacs")
    with scp:
        node = node_factory("ret", quiet_seconds=0.5, extra=(
            f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
            "[outbox]\npoll_seconds = 0.3\nretry_base_seconds = 30\n"
            f'[[destinations]]\nname = "pacs"\nae_title = "{scp.ae_title}"\nhost = "127.0.0.1"\nport = {scp.port}\n'))
        node.start()
        sent_study, unsent_study = uid(), uid()
        a = make_cr(tmp_path / "a.dcm", study_uid=sent_study, rows=300, cols=300)
        assert storescu(node.port, a).returncode == 0
        node.wait_for_event("outbox.sent", study_uid=sent_study, timeout=120)
        deadline = time.monotonic() + 60
        while len(node.events("outbox.sent", study_uid=sent_study)) < 2:
            assert time.monotonic() < deadline, "the SR of the first study was never sent"
            time.sleep(0.3)
    # the PACS is gone now: the next study's results stay pending
    b = make_cr(tmp_path / "b.dcm", study_uid=unsent_study, rows=300, cols=300)
    assert storescu(node.port, b).returncode == 0
    node.wait_for_event("outbox.retry", study_uid=unsent_study, timeout=120)

    def spooled(f):
        ds = dcmread(f, stop_before_pixels=True)
        return node.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"

    results = {s: list((node.data_dir / "outbox" / s).glob("*.dcm")) for s in (sent_study, unsent_study)}
    assert len(results[sent_study]) == 2 and len(results[unsent_study]) == 2
    out = cli("retention", "--days", "0.000001", config=node.config).stdout
    assert "removed 1 film(s) and 2 sent result file(s)" in out

    assert not spooled(a).exists() and not any(f.exists() for f in results[sent_study])
    assert spooled(b).exists() and all(f.exists() for f in results[unsent_study])  # not yet sent: kept
    removed = node.events("retention.removed")
    assert len(removed) == 3 and {r["study_uid"] for r in removed} == {sent_study}
    assert sorted(r["detail"]["kind"] for r in removed) == ["film", "result-sc", "result-sr"]
    # a second run finds nothing more to do
    assert "removed 0 film(s) and 0 sent result file(s)" in cli("retention", "--days", "0.000001",
                                                                  config=node.config).stdout
