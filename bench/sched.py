"""Fair scheduling (issue 27): does a small study wait behind a big one?

Starts a real Orthanc and cxr-node on 127.0.0.1 (free ports, the shipped configuration: release
rule with a 2 s grace, outbox poll 2 s, a destination to Orthanc; the bundled model, loaded and
warmed up first) and sends the real CR chest film RG1_UNCR (pydicom-data, 1955x1841) with dcmtk
storescu, re-identified per film:

    alone   ``--alone`` one-film studies, one after another: a one-film study's alone time
    after   a ``--big``-film study (one association), and as soon as its storescu exits, a
            one-film study: its latency against its alone time (goal: at most 2x)
    burst   a ``--burst-big``-film study, then ``--burst`` one-film studies, each by its own
            storescu, one after another: their p50 / p95 / max (goal: p95 <= 10 s), and when the
            big study is done (nothing starved)

Latency = the study's storescu exit -> its SR and every Secondary Capture stored in Orthanc
(Orthanc's series polled every 0.25 s).

    .venv/bin/python bench/sched.py [--big 40] [--burst-big 60] [--burst 20] [--alone 2]
                                    [--scenarios alone,after,burst] [--baseline DIR]

``--baseline DIR`` runs the same scenarios, in the same go, with the cxr-node code checked out in
DIR (``git archive REV | tar -x -C DIR``), after this checkout's run, and prints both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import conftest
from conftest import Node, Orthanc, free_port
from dicomgen import uid
from e2e import percentile


def study_files(src, out: Path, n: int) -> tuple[str, list[Path]]:
    """``n`` copies of ``src`` (a dataset) as one study of one series, new UIDs."""
    study, series = uid(), uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = src.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


def send(port: int, files: list[Path]) -> float:
    """storescu in one association; returns the perf_counter time it exited."""
    p = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "CXRNODE", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"storescu failed: {p.stderr[-2000:]}")
    return time.perf_counter()


class Watch:
    """When each study's SR and all its SCs are in Orthanc (one poll of every series per tick)."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.uids: dict[str, str] = {}  # Orthanc study id -> StudyInstanceUID

    def wait(self, expected: dict[str, int], timeout: float) -> dict[str, float]:
        """``expected``: StudyInstanceUID -> number of SCs; returns StudyInstanceUID -> perf_counter."""
        done: dict[str, float] = {}
        deadline = time.perf_counter() + timeout
        while len(done) < len(expected):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(expected) - len(done)} of {len(expected)} studies not in Orthanc "
                                   f"after {timeout:g} s")
            now = time.perf_counter()
            have: dict[str, dict[str, int]] = {}
            for s in self.orthanc.rest("POST", "/tools/find", {"Level": "Series", "Query": {}, "Expand": True}):
                parent = s["ParentStudy"]
                if parent not in self.uids:
                    self.uids[parent] = self.orthanc.rest("GET", f"/studies/{parent}")["MainDicomTags"]["StudyInstanceUID"]
                mod = s["MainDicomTags"].get("Modality", "")
                have.setdefault(self.uids[parent], {})[mod] = len(s["Instances"])
            for study, scs in expected.items():
                got = have.get(study, {})
                if study not in done and got.get("SR", 0) >= 1 and got.get("OT", 0) >= scs:
                    done[study] = now
            time.sleep(0.25)
        return done


def run(code: Path | None, args, src, work: Path) -> dict:
    root = work / ("baseline" if code else "tree")
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc", modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    node = Node(root / "node", port=node_port, log_level="INFO", extra=(
        '[outbox]\npoll_seconds = 2\n' + (f"sc_max_rows = {args.sc_max_rows}\n" if args.sc_max_rows else "")
        + '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    saved = conftest.REPO
    conftest.REPO = code or saved
    out: dict = {"code": str(code or REPO)}
    watch = Watch(orthanc)
    try:
        node.start()
        node.wait_log("model warmed up", timeout=600)
        if "alone" in args.scenarios:
            alone = []
            for i in range(args.alone):
                study, files = study_files(src, root / f"alone{i}", 1)
                t = send(node.port, files)
                alone.append(watch.wait({study: 1}, 300)[study] - t)
            out["alone"] = alone
        if "after" in args.scenarios:
            big, big_files = study_files(src, root / "big", args.big)
            small, small_files = study_files(src, root / "small", 1)
            t_big = send(node.port, big_files)
            t_small = send(node.port, small_files)
            done = watch.wait({big: args.big, small: 1}, 1800)
            out["after"] = {"small": done[small] - t_small, "big": done[big] - t_big,
                            "small_before_big": done[small] < done[big]}
        if "burst" in args.scenarios:
            big, big_files = study_files(src, root / "bbig", args.burst_big)
            smalls = [study_files(src, root / f"b{i}", 1) for i in range(args.burst)]
            t_big = send(node.port, big_files)
            sent = {}
            for study, files in smalls:
                sent[study] = send(node.port, files)
            done = watch.wait({big: args.burst_big, **{s: 1 for s, _ in smalls}}, 2400)
            lat = sorted(done[s] - t for s, t in sent.items())
            out["burst"] = {"small": lat, "big": done[big] - t_big, "sent_in": max(sent.values()) - t_big}
    finally:
        node.stop(timeout=120)
        orthanc.stop()
        conftest.REPO = saved
        shutil.rmtree(root / "orthanc" / "storage", ignore_errors=True)
    return out


def report(name: str, r: dict) -> None:
    print(f"\n{name} ({r['code']})")
    alone = r.get("alone")
    ref = None
    if alone:
        ref = statistics.median(alone)
        print(f"  alone: one-film study {', '.join(f'{x:.2f}' for x in alone)} s (median {ref:.2f} s)")
    if "after" in r:
        a = r["after"]
        ratio = f" = {a['small'] / ref:.2f}x its alone time" if ref else ""
        print(f"  after a big study: one-film study {a['small']:.2f} s{ratio}; the big study {a['big']:.2f} s; "
              f"small recorded first: {a['small_before_big']}")
    if "burst" in r:
        b = r["burst"]
        lat = b["small"]
        print(f"  burst of {len(lat)} one-film studies beside a big study (sent within {b['sent_in']:.1f} s of the "
              f"big study's exit): p50 {percentile(lat, 50):.2f} s  p95 {percentile(lat, 95):.2f} s  "
              f"max {max(lat):.2f} s; the big study {b['big']:.2f} s")


def main() -> int:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", type=int, default=40)
    ap.add_argument("--burst-big", type=int, default=60)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--alone", type=int, default=2)
    ap.add_argument("--scenarios", default="alone,after,burst")
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--sc-max-rows", type=int, default=None, help="[outbox] sc_max_rows (shipped: 2048)")
    args = ap.parse_args()
    args.scenarios = set(args.scenarios.split(","))
    src = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    work = Path(tempfile.mkdtemp(prefix="cxr-sched-"))
    started = dt.datetime.now(dt.timezone.utc)
    results = {"this tree": run(None, args, src, work)}
    if args.baseline:
        results["baseline"] = run(args.baseline.resolve(), args, src, work)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nscheduling {started:%Y-%m-%d %H:%M}-{dt.datetime.now(dt.timezone.utc):%H:%M} UTC on {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end); RG1_UNCR "
          f"(1955x1841 CR) copies; shipped configuration (release grace 2 s, outbox poll 2 s"
          + (f", sc_max_rows {args.sc_max_rows}" if args.sc_max_rows else "") + ")")
    for name, r in results.items():
        report(name, r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
