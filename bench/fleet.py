"""Fleet throughput: 1, 2 and 3 cxr-node processes on one PostgreSQL and one data_dir (issue 27),
and what the lease heartbeat costs.

For each fleet size a fresh database on one real PostgreSQL (started here, 127.0.0.1, free port), a
fresh shared data_dir and a real Orthanc as the PACS; N single-film studies (the real CR chest film
RG1_UNCR from pydicom-data, fresh UIDs each) are sent with dcmtk storescu, spread round-robin over
the nodes (one sender thread per node), and the clock runs from the first send until every study's
results (SC + SR) are sent to Orthanc (read from the shared database, checked in Orthanc at the
end). Throughput is studies per minute; the ratio is against the 1-node run of the same go. The
nodes run the bundled model and the shipped settings but for [fleet] heartbeat_seconds.

The heartbeat's cost is measured twice: one node with a heartbeat every 0.2 s (50 times the shipped
10 s) against the 1-node run, and the time of one heartbeat (renew the lease + look for expired
leases) in process, on PostgreSQL and on SQLite, with the rows the runs left.

    .venv/bin/python bench/fleet.py [--studies 12] [--nodes 1,2,3] [--beats 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # this checkout's cxr_node for the in-process heartbeat timing

from conftest import Node, Orthanc, Postgres
from e2e import film_copy


def done_count(url: str, studies: list[str]) -> int:
    """Studies whose every result object (at least an SC and an SR) has been sent."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(text("select study_uid, count(*), sum(case when state = 'sent' then 1 else 0 end) "
                                  "from outbox group by study_uid")).all()
    finally:
        eng.dispose()
    want = set(studies)
    return sum(1 for uid, n, sent in rows if uid in want and n >= 2 and n == sent)


def run_fleet(pg: Postgres, work: Path, n_nodes: int, films: list[Path], heartbeat: float, label: str) -> dict:
    from pydicom import dcmread

    url = pg.new_database(f"fleet_{label}")
    root = work / label
    orthanc = Orthanc(root / "orthanc").start()
    shared = root / "shared-data"
    nodes = []
    for i in range(n_nodes):
        node = Node(root / f"n{i}", db_url=url, log_level="INFO", extra=(
            f"[fleet]\nheartbeat_seconds = {heartbeat:g}\nlease_seconds = {max(30, 3 * heartbeat):g}\n"
            f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
        node.data_dir = shared
        node.config.write_text(node.config.read_text().replace(str(node.root / "data"), str(shared)))
        nodes.append(node)
    nodes[0].upgrade()
    try:
        for node in nodes:
            node.start(upgrade=False)
        for node in nodes:
            node.wait_log("model warmed up", timeout=600)
        studies = [dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in films]
        shares = [films[i::n_nodes] for i in range(n_nodes)]

        def send(node: Node, files: list[Path]) -> None:
            for f in files:
                subprocess.run(["storescu", "-aet", "BENCH", "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(f)],
                               check=True, capture_output=True, timeout=300)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=send, args=(node, share)) for node, share in zip(nodes, shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent_at = time.perf_counter() - t0
        while done_count(url, studies) < len(studies):
            if time.perf_counter() - t0 > 1800:
                raise TimeoutError(f"{label}: not every study's results were sent within 30 min")
            time.sleep(0.25)
        elapsed = time.perf_counter() - t0
        in_pacs = sum(1 for s in studies if len(orthanc.find(StudyInstanceUID=s)) >= 2)
        per_node = {}
        for node in nodes:
            per_node[node.port] = node.log.count(" analysed, ")
    finally:
        for node in nodes:
            node.stop()
        orthanc.stop()
    return {"label": label, "nodes": n_nodes, "heartbeat": heartbeat, "studies": len(films), "seconds": elapsed,
            "sent_seconds": sent_at, "per_minute": 60 * len(films) / elapsed, "in_pacs": in_pacs,
            "per_node": sorted(per_node.values(), reverse=True), "url": url, "data_dir": shared,
            "load": os.getloadavg()[0]}


def beat_cost(url: str, data_dir: Path, beats: int) -> float:
    """Median milliseconds of one heartbeat (renew + look for expired leases), in process."""
    from cxr_node import config
    from cxr_node.db.session import Database
    from cxr_node.study import leases

    settings = config.parse({"storage": {"data_dir": str(data_dir)}, "database": {"url": url}}, base_dir=data_dir)
    db = Database(url)
    node = "bench-heartbeat"
    leases.register(settings, db, node, "bench")
    hb = leases.Heartbeat(settings, db, node)
    times = []
    for _ in range(beats):
        t0 = time.perf_counter()
        hb.beat()
        times.append(time.perf_counter() - t0)
    leases.stopped(db, node, data_dir)
    db.dispose()
    return 1000 * statistics.median(times)


def main() -> int:
    from pydicom.data import get_testdata_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--nodes", default="1,2,3", help="fleet sizes, comma-separated (1 first: the reference)")
    ap.add_argument("--beats", type=int, default=200, help="heartbeats timed in process per backend")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="cxr-fleet-"))
    src = Path(get_testdata_file("RG1_UNCR.dcm"))
    pg = Postgres().start()
    runs = []
    try:
        for n in sizes:
            films = [film_copy(src, work / f"f{n}-{i}.dcm") for i in range(args.studies)]
            runs.append(run_fleet(pg, work, n, films, 10.0, f"n{n}"))
            print(f"{n} node(s): {runs[-1]['seconds']:.1f} s", flush=True)
        films = [film_copy(src, work / f"hb-{i}.dcm") for i in range(args.studies)]
        runs.append(run_fleet(pg, work, 1, films, 0.2, "hb"))
        print(f"1 node, heartbeat 0.2 s: {runs[-1]['seconds']:.1f} s", flush=True)
        pg_ms = beat_cost(runs[0]["url"], runs[0]["data_dir"], args.beats)
        sqlite_dir = work / "sqlite"
        sqlite_url = f"sqlite:///{sqlite_dir / 'cxr-node.db'}"
        from cxr_node.db import migrate

        migrate.upgrade(sqlite_url)
        sqlite_ms = beat_cost(sqlite_url, sqlite_dir, args.beats)
    finally:
        pg.stop()
    ref = runs[0]
    load = os.getloadavg()
    print(f"\nfleet throughput {dt.date.today()} on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f}), {args.studies} single-film studies of RG1_UNCR (1955x1841 CR) per run, "
          "bundled model, shipped settings, one PostgreSQL and one data_dir shared by the nodes, Orthanc as the PACS")
    print("| nodes | heartbeat (s) | first send -> all results sent (s) | studies/min | ratio to 1 node | "
          "studies analysed per node | load average (1 min) at the end |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    for r in runs:
        print(f"| {r['nodes']} | {r['heartbeat']:g} | {r['seconds']:.1f} | {r['per_minute']:.1f} | "
              f"**{r['per_minute'] / ref['per_minute']:.2f}** | {', '.join(map(str, r['per_node']))} | "
              f"{r['load']:.1f} |")
        assert r["in_pacs"] == r["studies"], f"{r['label']}: {r['in_pacs']} of {r['studies']} studies in Orthanc"
    print(f"one heartbeat (renew + takeover scan), median of {args.beats}: PostgreSQL {pg_ms:.2f} ms, "
          f"SQLite {sqlite_ms:.2f} ms; at the shipped 10 s period that is {pg_ms / 100:.3f}% / "
          f"{sqlite_ms / 100:.3f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
