"""Time to notification (issue 28): storescu's exit -> HL7 v2 ACK, -> FHIR 2xx, -> STOW-RS 200, beside
the C-STORE path, in one run with the shipped configuration.

Starts a real Orthanc with its DICOMweb plugin (two destinations of cxr-node: "pacs" by C-STORE and
"archive" by STOW-RS to the same Orthanc), a real MLLP listener that ACKs AA and a real HTTP server
as the FHIR endpoint (tests/helpers_peers.py), and cxr-node with the shipped settings (quiet_seconds
30, release_grace_seconds 2, outbox poll_seconds 2). Sends N single-film urgent studies (RG1_UNCR,
which the bundled model flags urgent, re-identified per study) one after another with storescu.
Per study, from storescu's exit: the HL7 ACK and the FHIR answer (as the listeners sent them), and
the last object of the study acknowledged by each destination (the audit trail's outbox.sent,
written right after the C-STORE response or the STOW-RS 200). The C-STORE path is the reference:
the ratios printed are against it, in the same go.

    .venv/bin/python bench/delivery.py [--studies 10] [--outbox-poll 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from conftest import Node, Orthanc, free_port, wait_port
from e2e import film_copy
from helpers_peers import Answer, HTTPPeer, MLLPPeer


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise TimeoutError(what)


def main() -> int:
    import subprocess

    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--outbox-poll", type=float, default=2.0, help="[outbox] poll_seconds (shipped: 2)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxr-delivery-"))
    orthanc = Orthanc(work / "orthanc", dicomweb=True).start()
    mllp, fhir = MLLPPeer(), HTTPPeer([Answer(200, {"resourceType": "Bundle"}, "application/fhir+json")])
    node = Node(work / "node", port=free_port(), quiet_seconds=30, log_level="INFO", extra=(
        f"[outbox]\npoll_seconds = {args.outbox_poll:g}\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        f'[[destinations]]\nname = "archive"\nkind = "dicomweb"\nurl = "http://127.0.0.1:{orthanc.http_port}/dicom-web"\n'
        f'[[notifications]]\nname = "ris"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = {mllp.port}\n'
        f'[[notifications]]\nname = "fhir"\nkind = "fhir"\nurl = "{fhir.url}/fhir"\n'))
    try:
        node.start()
    except TimeoutError:  # a loaded machine: the port may take longer than conftest's 20 s
        wait_port(node.port, timeout=300, proc=node.proc)
        node.wait_log(node.READY, timeout=300)
    src = Path(get_testdata_file("RG1_UNCR.dcm"))
    rows = []
    try:
        node.wait_log("model warmed up", timeout=300)
        for i in range(args.studies + 1):  # the first is the warm-up
            film = film_copy(src, work / f"s{i}.dcm")
            study = str(dcmread(film, stop_before_pixels=True).StudyInstanceUID)
            p = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(film)],
                               capture_output=True, text=True, timeout=120)
            exited = time.time()
            if p.returncode:
                raise RuntimeError(p.stderr)
            wait(lambda i=i: len(mllp.acked_at) > i and len(fhir.answered_at) > i, 120, f"no notification for {study}")

            def sent(dest, study=study):
                return [r for r in node.events("outbox.sent", study_uid=study) if r["detail"]["destination"] == dest]

            wait(lambda: len(sent("pacs")) >= 2 and len(sent("archive")) >= 2, 120, f"results of {study} not sent")
            last = {d: max(dt.datetime.fromisoformat(r["time"]).timestamp() for r in sent(d)) for d in ("pacs", "archive")}
            done = max(dt.datetime.fromisoformat(r["time"]).timestamp()
                       for r in node.events("study.processed", study_uid=study))
            rows.append({"hl7": mllp.acked_at[i] - exited, "fhir": fhir.answered_at[i] - exited,
                         "stow": last["archive"] - exited, "cstore": last["pacs"] - exited, "analysed": done - exited})
            print("study", i, " ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()), flush=True)
    finally:
        try:
            node.stop(timeout=120)
        except Exception:  # a loaded machine: the figures are taken already
            node.kill()
        orthanc.stop()
        mllp.stop()
        fhir.stop()
    warm, runs = rows[0], rows[1:]
    print(f"\ntime to notification {dt.date.today()} on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), "
          f"{len(runs)} single-film urgent studies of RG1_UNCR, shipped configuration (quiet_seconds 30, release "
          f"grace 2 s, outbox poll_seconds {args.outbox_poll:g}); seconds from storescu's exit:")
    ref = statistics.median(r["cstore"] for r in runs)
    for key, what in (("hl7", "HL7 v2 ORU^R01 ACK (AA)"), ("fhir", "FHIR Bundle 200"),
                      ("stow", "STOW-RS 200, last object"), ("cstore", "C-STORE, last object (reference)")):
        v = [r[key] for r in runs]
        q = statistics.quantiles(v, n=20, method="inclusive") if len(v) > 1 else v * 19
        print(f"  {what:34s} p50 {statistics.median(v):5.2f}  p95 {q[18]:5.2f}  max {max(v):5.2f}  "
              f"(p50 / C-STORE p50: {statistics.median(v) / ref:.2f})")
    a = statistics.median(r["analysed"] for r in runs)
    print(f"  results in the outbox (study.processed): p50 {a:.2f}; after it, p50: "
          + ", ".join(f"{k} {statistics.median(r[k] - r['analysed'] for r in runs):.2f}"
                      for k in ("hl7", "fhir", "stow", "cstore")))
    print(f"  warm-up study: HL7 {warm['hl7']:.2f}, STOW-RS {warm['stow']:.2f}, C-STORE {warm['cstore']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
