"""Results where today's archives and reading rooms look, end to end with the daemon: a film is
sent with the C-STORE Priority HIGH; its Secondary Capture and SR reach a real Orthanc over STOW-RS (its DICOMweb
plugin) and are read back over WADO-RS byte for byte; the urgent call reaches a real MLLP
listener as ORU^R01 (ACK AA) and a real HTTP server as a FHIR Bundle; `echo --to` probes QIDO-RS;
and after a reload that changes the [triage] triggers, `reprocess` makes a version whose call
differs, which is sent again as a correction, its priority not below the C-STORE's HIGH."""

from __future__ import annotations

import io
import json
import signal
import urllib.request

from conftest import cli, free_port
from conftest import wait_until as _wait
from helpers_model import bundled_or_tiny
from helpers_peers import Answer, HTTPPeer, MLLPPeer, segments
from pydicom import dcmread


def _store_high(port: int, path) -> None:
    """C-STORE with the request's Priority HIGH (what a modality sets for a STAT exam)."""
    from pynetdicom import AE

    ds = dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds, priority=1)
    finally:
        assoc.release()
    assert rsp.Status == 0


def _wado(orthanc, study: str) -> dict[str, bytes]:
    """WADO-RS: every instance of the study, SOP Instance UID -> the Part 10 bytes served."""
    req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies/{study}",
                                 headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(req, timeout=30) as r:
        ctype, body = r.headers["Content-Type"], r.read()
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    out = {}
    for part in body.split(b"--" + boundary)[1:-1]:
        data = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
        out[str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
    return out


def test_stow_wado_hl7_fhir_and_a_correction(node_factory, orthanc_factory, films, tmp_path):
    orthanc = orthanc_factory(dicomweb=True).start()
    mllp, fhir = MLLPPeer(), HTTPPeer([Answer(200, {"resourceType": "Bundle"}, "application/fhir+json")])
    try:
        ckpt = bundled_or_tiny(tmp_path / "model")
        base = (f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
                "[outbox]\npoll_seconds = 0.5\nretry_base_seconds = 1\nretry_max_seconds = 2\n")
        channels = (f'[[destinations]]\nname = "archive"\nkind = "dicomweb"\n'
                    f'url = "http://127.0.0.1:{orthanc.http_port}/dicom-web"\n'
                    f'[[notifications]]\nname = "ris"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = {mllp.port}\n'
                    f'[[notifications]]\nname = "fhir"\nkind = "fhir"\nurl = "{fhir.url}/fhir"\n')
        node = node_factory("cxr", port=free_port(), quiet_seconds=1, extra=base + channels).start()
        assert "HTTP 200" in cli("echo", "--to", "archive", config=node.config).stdout

        _store_high(node.port, films["RG1_UNCR"])
        study = str(dcmread(films["RG1_UNCR"], stop_before_pixels=True).StudyInstanceUID)
        sent = _wait(lambda: [r for r in node.events("outbox.sent") if r["study_uid"] == study], 180,
                     "results not sent over STOW-RS", node)
        _wait(lambda: len([r for r in node.events("outbox.sent") if r["study_uid"] == study]) >= 2, 30,
              "SC and SR not both sent", node)
        _wait(lambda: len(node.events("notify.sent")) >= 2, 30, "notifications not sent", node)

        # STOW-RS -> WADO-RS: the objects Orthanc serves are the bytes in the outbox
        rows = node.db().execute("select sop_instance_uid, path, kind, last_status from outbox").fetchall()
        served = _wado(orthanc, study)
        assert {k for _, _, k, _ in rows} == {"sc", "sr"} and all(st == 200 for *_, st in rows)
        for sop, path, kind, _ in rows:
            assert served[sop] == (node.data_dir / "outbox" / path).read_bytes(), kind
        sr = dcmread(io.BytesIO(next(served[s] for s, _, k, _ in rows if k == "sr")))
        assert sr.Modality == "SR" and sr.StudyInstanceUID == study
        assert sent[0]["detail"]["destination"] == "archive"

        # the urgent call over HL7 v2 (ACK AA) and FHIR
        (msg,) = mllp.received
        seg = segments(msg)
        assert seg["MSH"][0][9] == "ORU^R01^ORU_R01" and seg["OBR"][0][25] == "F"
        assert seg["OBX"][0][5].startswith("Urgent:") and "NOT FOR DIAGNOSTIC USE" in seg["OBX"][0][5]
        assert seg["OBX"][-1][5] == study and seg["TQ1"][0][9].startswith("S^")
        bundle = json.loads(fhir.received[0].body)
        assert bundle["entry"][0]["resource"]["status"] == "final"
        status = json.loads(cli("status", "--format", "json", config=node.config).stdout)
        assert status["notifications"] == {"pending": 0, "sent": 2, "dead": 0, "oldest_pending_seconds": None}

        # a reload narrows the triggers; reprocessing changes the call: a correction follows
        node.config.write_text(node.config.read_text().replace(
            "[outbox]", '[triage]\ntriggers = ["Viral Pneumonia"]\n[outbox]'))
        node.proc.send_signal(signal.SIGHUP)
        node.wait_log("configuration reloaded")
        cli("reprocess", study, config=node.config)
        _wait(lambda: len(mllp.received) == 2 and len(fhir.received) == 2, 120, "no correction", node)
        seg = segments(mllp.received[1])
        assert seg["OBR"][0][25] == "C" and not seg["OBX"][0][5].startswith("Urgent")
        assert json.loads(fhir.received[1].body)["entry"][0]["resource"]["status"] == "corrected"
        assert node.db().execute("select dimse_priority from instances").fetchall() == [(1,)]
        processed = [r for r in node.events("study.processed") if r["study_uid"] == study]
        assert processed[0]["detail"]["upstream"] == "C-STORE Priority HIGH"
        assert processed[-1]["detail"]["sent_priority"] == "A"  # not urgent now, never below upstream's HIGH
        assert segments(mllp.received[1])["TQ1"][0][9].startswith("A^")
        assert processed[-1]["detail"]["triggers"] == ["Viral Pneumonia"]
        assert processed[-1]["detail"]["notified"] == ["ris", "fhir"]
        _wait(lambda: len(node.events("notify.sent")) >= 4, 30, "corrections not acknowledged", node)
        listed = json.loads(cli("outbox", "list", "--notifications", "--format", "json", config=node.config).stdout)
        assert [(r["channel"], r["state"], r["correction"]) for r in listed] == \
            [("ris", "sent", False), ("fhir", "sent", False), ("ris", "sent", True), ("fhir", "sent", True)]
    finally:
        mllp.stop()
        fhir.stop()
