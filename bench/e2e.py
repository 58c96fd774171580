"""End-to-end latency: storescu's exit -> the study's SR and Secondary Capture stored in Orthanc.

Starts a real Orthanc and cxr-node on 127.0.0.1 (free ports), sends N single-film studies (the
real CR chest film RG1_UNCR from pydicom-data, re-identified per study) with dcmtk storescu one
after another, and polls Orthanc for each study's SR and SC. By default the node runs the shipped
configuration (quiet_seconds 30, release_grace_seconds 2, outbox poll_seconds 2), so the figure
is what a site sees: the association's release completes the study (issue 22). A warm-up study
(model load) is reported separately, and each study's time is split by the audit trail into
release -> complete (the grace), complete -> processed (analysis), processed -> last sent.
With --screenshot, saves Orthanc's own rendering (/instances/{id}/preview) of the first Secondary
Capture: what a radiologist's viewer shows.

    .venv/bin/python bench/e2e.py [--studies 10] [--quiet 30] [--outbox-poll 2] [--no-release]
                                  [--checkpoint PATH] [--screenshot PNG]

--no-release turns the release rule off (the quiet period alone, as before issue 22); the figure
printed then has quiet_seconds subtracted, as the earlier runs in bench/RESULTS.md did.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
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

from conftest import Node, Orthanc, free_port
from dicomgen import uid


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank: a value that was measured, for any number of values
    (one study: that study's time; ``statistics.quantiles`` needs two and extrapolates beyond the
    largest value with few)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def film_copy(src: Path, dst: Path) -> Path:
    from pydicom import dcmread

    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid(), uid(), uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


def one_study(node: Node, orthanc: Orthanc, film: Path, timeout: float = 120) -> tuple[float, str, dt.datetime]:
    """Seconds from storescu's exit to the SR and the SC in Orthanc; the study UID; the exit time."""
    from pydicom import dcmread

    study = dcmread(film, stop_before_pixels=True).StudyInstanceUID
    p = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(film)],
                       capture_output=True, text=True, timeout=120)
    t0 = time.perf_counter()
    exited = dt.datetime.now(dt.timezone.utc)
    if p.returncode != 0:
        raise RuntimeError(f"storescu failed: {p.stderr}")
    while time.perf_counter() - t0 < timeout:
        if orthanc.find(StudyInstanceUID=study, Modality="SR") and orthanc.find(StudyInstanceUID=study, Modality="OT"):
            return time.perf_counter() - t0, study, exited
        time.sleep(0.02)
    raise TimeoutError(f"no SR and SC for {study} in {timeout}s; log tail:\n{node.log[-2000:]}")


def stages(node: Node, study: str, exited: dt.datetime) -> dict[str, float]:
    """Seconds from storescu's exit to each step of the study, from the audit trail."""
    rows = node.audit("--study", study)
    at = {}
    for r in rows:
        key = r["event"]
        at.setdefault(key, dt.datetime.fromisoformat(r["time"]))
        if key == "outbox.sent":
            at["outbox.sent"] = dt.datetime.fromisoformat(r["time"])  # the last one
    done = next(r for r in rows if r["event"] == "study.complete")
    out = {k: (at[k] - exited).total_seconds() for k in ("study.complete", "study.processing", "study.processed",
                                                       "outbox.sent") if k in at}
    out["rule"] = done["detail"].get("rule")
    return out


def main() -> int:
    from pydicom.data import get_testdata_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--quiet", type=float, default=30.0, help="[study] quiet_seconds (shipped: 30)")
    ap.add_argument("--outbox-poll", type=float, default=2.0, help="[outbox] poll_seconds (shipped: 2)")
    ap.add_argument("--no-release", action="store_true",
                    help="[study] complete_on_release = false: the quiet period alone (subtracted from the figure)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    ap.add_argument("--sc-max-rows", type=int, default=None,
                    help="[outbox] sc_max_rows (shipped: 2048; 512 is about the Secondary Capture's size before issue 19)")
    ap.add_argument("--screenshot", type=Path, default=None, help="save Orthanc's preview of the first SC here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxr-e2e-"))
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    model = f'[model]\ncheckpoint = "{args.checkpoint.resolve()}"\n' if args.checkpoint else ""
    node = Node(work / "node", port=node_port, quiet_seconds=args.quiet, log_level="INFO",
                study_extra="complete_on_release = false" if args.no_release else "", extra=(
                    f"{model}[outbox]\npoll_seconds = {args.outbox_poll:g}\n"
                    + (f"sc_max_rows = {args.sc_max_rows}\n" if args.sc_max_rows else "") +
                    f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
                    f"port = {orthanc.dicom_port}\n"))
    node.start()
    subtract = args.quiet if args.no_release else 0.0
    timeout = 120 + subtract
    try:
        node.wait_log("model warmed up", timeout=300)  # loaded and warmed up (preload): a running node's figure
        src = Path(get_testdata_file("RG1_UNCR.dcm"))
        warm = one_study(node, orthanc, film_copy(src, work / "warm.dcm"), timeout=300 + subtract)[0] - subtract
        runs = [one_study(node, orthanc, film_copy(src, work / f"s{i}.dcm"), timeout=timeout)
                for i in tqdm(range(args.studies), desc="studies", unit="study")]
        lat = [t - subtract for t, _, _ in runs]
        split = [stages(node, study, exited) for _, study, exited in runs]
        if args.screenshot:
            ids = [i["ID"] for i in orthanc.find(Modality="OT")]  # our Secondary Captures (highdicom: OT)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            args.screenshot.write_bytes(orthanc.rest("GET", f"/instances/{ids[0]}/preview"))
            print(f"saved Orthanc's preview of a Secondary Capture to {args.screenshot}")
    finally:
        node.stop()
        orthanc.stop()
    rules = sorted({s["rule"] for s in split})
    print(f"\ne2e latency {dt.date.today()} on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), "
          f"{args.studies} single-film studies of RG1_UNCR (1955x1841 CR), storescu's exit -> SR and SC in Orthanc; "
          f"quiet_seconds {args.quiet:g}{' (subtracted)' if subtract else ''}, release rule "
          f"{'off' if args.no_release else 'on (grace 2 s)'}, outbox poll_seconds {args.outbox_poll:g}; "
          f"completed by rule: {', '.join(map(str, rules))}")
    if not lat:
        print("  no studies timed (--studies 0): the warm-up study only")
    else:
        print(f"  p50 {statistics.median(lat):.2f} s   p95 {percentile(lat, 95):.2f} s   min {min(lat):.2f} s   "
              f"max {max(lat):.2f} s")
    for key, what in (("study.complete", "complete"), ("study.processing", "analysis starts"),
                      ("study.processed", "results in the outbox"), ("outbox.sent", "last object sent")):
        vals = [s[key] - subtract for s in split if key in s]
        if vals:
            print(f"  storescu exit -> {what:22s} median {statistics.median(vals):.2f} s")
    print(f"  warm-up study (the first after start-up, model loaded): {warm:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
