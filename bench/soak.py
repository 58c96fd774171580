"""Memory over a long run: send studies through the daemon and record its RSS as they are analysed.

Starts a real Orthanc (the PACS) and cxr-node on 127.0.0.1, then sends single-film studies (real
chest films: pydicom-data's RG1_UNCR resized to sizes drawn from 256-2600 px, with noise, fresh
UIDs) with dcmtk storescu, ``--per-association`` studies per association. At each checkpoint it
lets the node finish, then asks it for its memory census (SIGUSR1, cxr_node.node.memory): RSS, peak,
threads and Python objects by type, so a leak (per-study objects growing) can be told from
allocator high water (objects flat, RSS up). Results go to Orthanc, so the outbox and the sender
are part of the run.

Two daemons in one go (``--compare``): with cxr-node's allocator settings (the default: glibc
arenas capped and freed memory returned after each batch, cxr_node.node.memory) and with them off
(``CXR_NODE_MALLOC_TUNING=0``), so the figures are a ratio measured under the same load.

    .venv/bin/python bench/soak.py [--studies 1000] [--checkpoints 100,500,1000] [--per-association 10]
                                   [--compare]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import Node, Orthanc, free_port
from dicomgen import uid


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def processed(node: Node) -> int:
    with node.db() as c:
        return c.execute("select count(*) from studies where state = 'processed'").fetchone()[0]


def census(node: Node, n: int) -> dict:
    """SIGUSR1: the daemon logs its memory census (cxr_node.node.memory); the n-th one, parsed."""
    import json
    import signal

    node.proc.send_signal(signal.SIGUSR1)
    node.wait_log("memory census", count=n, timeout=120)
    line = [x for x in node.log.splitlines() if "memory census" in x][n - 1]
    return json.loads(line.split(": ", 2)[2])


def one_run(label: str, env: dict[str, str], args, src: Path, work: Path) -> list[dict]:
    import numpy as np
    from dicomgen import make_cr

    work.mkdir(parents=True, exist_ok=True)
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    node = Node(work / "node", port=node_port, log_level="WARNING", extra=(
        "[outbox]\npoll_seconds = 2\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        node.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rng = np.random.default_rng(0)  # the same films in both runs
    films = work / "films"
    films.mkdir(exist_ok=True)
    points = sorted(args.checkpoints)
    rows = []
    sent = 0
    t0 = time.monotonic()
    try:
        while points:
            batch = []
            for k in range(min(args.per_association, points[0] - sent)):
                # films of many sizes, as a fuzz run or a real site sends them
                rows_, cols = (int(x) for x in rng.integers(256, 2600, 2)) if args.varied else (1955, 1841)
                batch.append(str(make_cr(films / f"{k}.dcm", study_uid=uid(), rows=rows_, cols=cols,
                                         seed=int(rng.integers(1 << 30)))))
            p = subprocess.run(["storescu", "-aet", "SOAK", "-aec", "CXRNODE", "127.0.0.1", str(node_port), *batch],
                               capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"storescu failed: {p.stderr[-2000:]}")
            sent += len(batch)
            # keep at most two associations' worth waiting: the node analyses while the next is sent
            while processed(node) < sent - 2 * args.per_association:
                time.sleep(0.5)
            if sent == points[0]:  # a checkpoint: let the node finish, then measure it idle
                deadline = time.monotonic() + 600
                while processed(node) < sent and time.monotonic() < deadline:
                    time.sleep(0.5)
                time.sleep(3)  # the last results sent
                c = census(node, len(rows) + 1)
                c.update(studies=points.pop(0), seconds=round(time.monotonic() - t0))
                rows.append(c)
                print(f"  [{label}] {c['studies']} studies: RSS {c['rss_mib']} MiB, peak {c['peak_mib']} MiB, "
                      f"threads {c['threads']}, objects {c['objects']}, per study {c['per_study']} "
                      f"({c['seconds']} s)", flush=True)
    finally:
        node.stop()
        orthanc.stop()
    return rows


def main() -> int:
    from pydicom.data import get_testdata_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--checkpoints", default=None, help="comma-separated study counts (default: 10%%, 50%%, 100%%)")
    ap.add_argument("--per-association", type=int, default=10)
    ap.add_argument("--compare", action="store_true", help="also run with the allocator settings off")
    ap.add_argument("--same-size", dest="varied", action="store_false",
                    help="every film 1955x1841 (default: sizes drawn from 256-2600 px each way)")
    args = ap.parse_args()
    args.checkpoints = ([int(x) for x in args.checkpoints.split(",")] if args.checkpoints else
                        [max(1, args.studies // 10), max(1, args.studies // 2), args.studies])
    src = Path(get_testdata_file("RG1_UNCR.dcm"))
    work = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    runs = [("tuned", {"CXR_NODE_MALLOC_TUNING": "1"})]
    if args.compare:
        runs.append(("untuned", {"CXR_NODE_MALLOC_TUNING": "0"}))
    results = {label: one_run(label, env, args, src, work / label) for label, env in runs}
    print(f"\nsoak {dt.date.today()} on {platform.node()} ({os.cpu_count()} CPUs): {args.studies} single-film studies "
          f"({'chest films of 256-2600 px' if args.varied else 'RG1_UNCR'}), {args.per_association} per storescu "
          "association, results to Orthanc")
    for label, rows in results.items():
        first = rows[0]["rss_mib"]
        cells = ", ".join(f"{r['studies']}: {r['rss_mib']} MiB ({r['rss_mib'] / first:.2f}x)" for r in rows)
        print(f"  {label:8s} idle RSS after {cells}; peak {max(r['peak_mib'] for r in rows)} MiB; Python objects "
              f"{' -> '.join(str(r['objects']) for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
