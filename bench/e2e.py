"""End-to-end latency: last C-STORE success -> SR stored in Orthanc, minus quiet_seconds.

Starts a real Orthanc and cxr-node on 127.0.0.1 (free ports), sends N single-film studies (the
real CR chest film RG1_UNCR from pydicom-data, re-identified per study) with dcmtk storescu one
after another, and polls Orthanc for each study's SR. A warm-up study (model load) is reported
separately. With --screenshot, saves Orthanc's own rendering (/instances/{id}/preview) of the
first Secondary Capture: what a radiologist's viewer shows.

    .venv/bin/python bench/e2e.py [--studies 20] [--quiet 1] [--checkpoint PATH] [--screenshot PNG]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import Node, Orthanc, free_port  # noqa: E402
from dicomgen import uid  # noqa: E402


def film_copy(src: Path, dst: Path) -> Path:
    from pydicom import dcmread

    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid(), uid(), uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


def one_study(node: Node, orthanc: Orthanc, film: Path, timeout: float = 120) -> float:
    from pydicom import dcmread

    study = dcmread(film, stop_before_pixels=True).StudyInstanceUID
    p = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(film)],
                       capture_output=True, text=True, timeout=120)
    t0 = time.perf_counter()
    if p.returncode != 0:
        raise RuntimeError(f"storescu failed: {p.stderr}")
    while time.perf_counter() - t0 < timeout:
        if orthanc.find(StudyInstanceUID=study, Modality="SR"):
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise TimeoutError(f"no SR for {study} in {timeout}s; log tail:\n{node.log[-2000:]}")


def main() -> int:
    from pydicom.data import get_testdata_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--quiet", type=float, default=1.0, help="[study] quiet_seconds for the run")
    ap.add_argument("--outbox-poll", type=float, default=0.2,
                    help="[outbox] poll_seconds for the run (the shipped default is 2)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    ap.add_argument("--screenshot", type=Path, default=None, help="save Orthanc's preview of the first SC here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxr-e2e-"))
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    model = f'[model]\ncheckpoint = "{args.checkpoint.resolve()}"\n' if args.checkpoint else ""
    node = Node(work / "node", port=node_port, quiet_seconds=args.quiet, log_level="WARNING", extra=(
        f"{model}[outbox]\npoll_seconds = {args.outbox_poll:g}\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    node.start()
    try:
        src = Path(get_testdata_file("RG1_UNCR.dcm"))
        warm = one_study(node, orthanc, film_copy(src, work / "warm.dcm"), timeout=300) - args.quiet
        lat = [one_study(node, orthanc, film_copy(src, work / f"s{i}.dcm")) - args.quiet
               for i in tqdm(range(args.studies), desc="studies", unit="study")]
        if args.screenshot:
            ids = [i["ID"] for i in orthanc.find(Modality="OT")]  # our Secondary Captures (highdicom: OT)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            args.screenshot.write_bytes(orthanc.rest("GET", f"/instances/{ids[0]}/preview"))
            print(f"saved Orthanc's preview of a Secondary Capture to {args.screenshot}")
    finally:
        node.stop()
        orthanc.stop()
    q = statistics.quantiles(lat, n=20)
    print(f"\ne2e latency {dt.date.today()} on {platform.node()} ({platform.machine()}), {args.studies} single-film "
          f"studies of RG1_UNCR (1955x1841 CR), quiet_seconds {args.quiet:g} subtracted, "
          f"outbox poll_seconds {args.outbox_poll:g}")
    print(f"  p50 {statistics.median(lat):.2f} s   p95 {q[18]:.2f} s   min {min(lat):.2f} s   max {max(lat):.2f} s")
    print(f"  warm-up study (includes loading torch and the model): {warm:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
