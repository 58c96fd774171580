"""Refused films through the real daemon: the audit row carries the reason, the study's SR names the
film as not analysed, nothing is flagged, and the chest film of the same study is analysed."""

from __future__ import annotations

import json
import time

from conftest import StoreSCP, cli, storescu
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint
from pydicom import dcmread

from cxr_node.encode.sr import read_findings


def _node(node_factory, tmp_path, pacs, name):
    """A node with a model that flags every analysed film urgent, sending to ``pacs``."""
    ckpt = make_checkpoint(tmp_path / f"{name}.pt", input_size=64, thresholds={"COVID": 0.0})
    return node_factory(name, quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n[outbox]\npoll_seconds = 0.3\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
    )).start()


def test_a_film_without_lungs_is_refused_audited_and_named_in_the_sr(node_factory, tmp_path):
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = _node(node_factory, tmp_path, pacs, "elig")
        study = uid()
        noise = make_cr(tmp_path / "noise.dcm", study_uid=study, rows=300, cols=300, pixels="random")
        chest = make_cr(tmp_path / "chest.dcm", study_uid=study, rows=300, cols=300, seed=3)
        assert storescu(node.port, noise, chest).returncode == 0
        node.wait_for_event("study.processed", timeout=120, study_uid=study)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(node.events("outbox.sent", study_uid=study)) < 2:
            time.sleep(0.3)
        sent = [dcmread(p) for p in pacs.out_dir.iterdir()]
    noise_uid = dcmread(noise, stop_before_pixels=True).SOPInstanceUID
    chest_uid = dcmread(chest, stop_before_pixels=True).SOPInstanceUID
    (skipped,) = node.events("image.skipped", study_uid=study)
    assert skipped["sop_instance_uid"] == noise_uid
    assert "lung field" in skipped["reason"]
    assert skipped["outcome"] == "warning"  # a refusal is not a success (nor an error for `status`)
    (triaged,) = node.events("image.triaged", study_uid=study)
    assert triaged["sop_instance_uid"] == chest_uid and triaged["detail"]["urgent"] is True
    (processed,) = node.events("study.processed", study_uid=study)
    assert processed["detail"]["refused"] == 1 and processed["detail"]["analysed"] == 1
    assert processed["detail"]["priority"] == "urgent"
    scs = [ds for ds in sent if ds.Modality != "SR"]
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in scs] == [chest_uid]  # no SC for noise
    (sr,) = [ds for ds in sent if ds.Modality == "SR"]
    by_source = {f["source_sop_uids"][0]: f for f in read_findings(sr)}
    assert by_source[noise_uid]["finding"] == "Not analysed"
    assert by_source[noise_uid]["evaluations"] == {"Reason not analysed": "No plausible lung fields found"}
    assert by_source[noise_uid]["probabilities"] == {}
    assert by_source[chest_uid]["probabilities"]  # the analysed film has its probabilities
    status = json.loads(cli("status", "--format", "json", config=node.config).stdout)
    assert status["films_not_analysed"] == {"no_lung_fields": 1}


def test_a_study_with_only_refused_films_still_gets_an_sr_and_no_flag(node_factory, tmp_path):
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = _node(node_factory, tmp_path, pacs, "elig2")
        study = uid()
        assert storescu(node.port, make_cr(tmp_path / "n.dcm", study_uid=study, pixels="random")).returncode == 0
        (processed,) = node.wait_for_event("study.processed", timeout=120, study_uid=study)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not node.events("outbox.sent", study_uid=study):
            time.sleep(0.3)
        sent = [dcmread(p) for p in pacs.out_dir.iterdir()]
    assert processed["detail"]["priority"] is None and processed["detail"]["analysed"] == 0
    assert "no film was analysed" in processed["reason"]
    assert not node.events("image.triaged", study_uid=study)
    assert [ds.Modality for ds in sent] == ["SR"]
    assert read_findings(sent[0])[0]["finding"] == "Not analysed"


def test_a_study_with_no_chest_film_by_its_header_gets_no_sr(node_factory, tmp_path):
    """A tibia (header EXTREMITY) was never a triage candidate: audited as skipped, nothing sent.
    In the same node a film whose header says chest but whose pixels are refused keeps its SR."""
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = _node(node_factory, tmp_path, pacs, "elig3")
        tibia_study, chest_study = uid(), uid()
        tibia = make_cr(tmp_path / "tibia.dcm", study_uid=tibia_study, raw={"BodyPartExamined": ("CS", b"EXTREMITY ")})
        noise = make_cr(tmp_path / "noise.dcm", study_uid=chest_study, pixels="random")
        assert storescu(node.port, tibia, noise).returncode == 0
        (tibia_done,) = node.wait_for_event("study.processed", timeout=120, study_uid=tibia_study)
        node.wait_for_event("study.processed", timeout=120, study_uid=chest_study)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not node.events("outbox.sent", study_uid=chest_study):
            time.sleep(0.3)
        time.sleep(1.0)  # the outbox polls every 0.3 s: anything queued for the tibia would be sent by now
        sent = [dcmread(p) for p in pacs.out_dir.iterdir()]
    (skipped,) = node.events("image.skipped", study_uid=tibia_study)
    assert "BodyPartExamined is EXTREMITY" in skipped["reason"]
    assert tibia_done["detail"]["objects"] == 0 and tibia_done["detail"]["queued"] == 0
    assert "no SR sent" in tibia_done["reason"]
    assert not node.events("outbox.queued", study_uid=tibia_study)
    assert [ds.StudyInstanceUID for ds in sent] == [chest_study]  # only the pixel-refused chest film's SR
    (sr,) = sent
    assert read_findings(sr)[0]["finding"] == "Not analysed"
