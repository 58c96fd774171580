"""Web console: worklist response time with many studies in the database.

Fills a fresh database with --studies studies (2 films each, their image results and outbox
rows; priorities mixed), starts a real `cxr-node web` on 127.0.0.1, logs in, and times requests
one at a time from a keep-cookies HTTP client, alternating each measured page with the reference
page ``/healthz`` (the same process, HTTP stack and a database round trip, but no page work):

    worklist          GET /                        (first page, urgent first)
    worklist_station  GET /?station=...            (a filter that needs the instances table)
    worklist_deep     GET /?page=N                 (a late page: the offset cost)
    api               GET /api/studies             (the same page as JSON)

It prints p50/p95 in milliseconds and the ratio p95(page) / p95(reference). Goal: the worklist
answers in under 300 ms p95 on 2 cores with 10,000 studies.

    .venv/bin/python bench/web.py [--studies 10000] [--requests 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import cli
from helpers_web import Client, WebConsole, add_user

STATIONS = [f"CR-ROOM-{i}" for i in range(1, 9)] + [f"DX-WARD-{i}" for i in range(1, 5)]


def seed(config: Path, n: int) -> float:
    """``n`` studies with their rows, written with the project's models in one transaction."""
    from sqlalchemy import insert

    from cxr_node.config import load
    from cxr_node.db.models import ImageResult, Instance, OutboxItem, Study
    from cxr_node.db.session import Database

    t0 = time.perf_counter()
    rng = random.Random(0)
    db = Database(load(config).database.url)
    start = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
    studies, instances, results, outbox = [], [], [], []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.10.1394.9.{i}"
        t = start + dt.timedelta(minutes=5 * i)
        prio = rng.choices(["urgent", "review", "routine", None], [1, 2, 6, 1])[0]
        state = "processed" if prio else rng.choice(["receiving", "queued", "failed"])
        studies.append(dict(study_uid=uid, state=state, version=1, patient_id=f"PID{i % 4000:05d}", instance_count=2,
                            first_received_at=t, last_received_at=t, state_changed_at=t + dt.timedelta(seconds=40),
                            priority=prio, processed_version=1 if prio else None))
        station = rng.choice(STATIONS)
        for k in range(2):
            sop = f"{uid}.{k + 1}"
            instances.append(dict(sop_instance_uid=sop, study_uid=uid, series_uid=f"{uid}.0", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                  transfer_syntax="1.2.840.10008.1.2.1", path=f"{uid}/{sop}.dcm", bytes=10_000_000,
                                  patient_id=f"PID{i % 4000:05d}", triage_eligible=True, study_version=1,
                                  calling_aet=station, received_at=t))
            if prio:
                analysed = k == 0 or rng.random() < 0.7
                results.append(dict(study_uid=uid, study_version=1, sop_instance_uid=sop, analysed=analysed,
                                    reason=None if analysed else "ViewPosition is LL", model_version="bench",
                                    top_label="COVID" if analysed else None, urgent=prio == "urgent" if analysed else None,
                                    priority=prio if analysed else None,
                                    probabilities={"COVID": 0.5, "Normal": 0.3, "Viral Pneumonia": 0.2} if analysed else None,
                                    sc_sop_instance_uid=f"2.25.{i}{k}" if analysed else None, created_at=t))
        if prio:
            for kind, sop in (("sc", f"2.25.{i}0"), ("sr", f"2.25.{i}9")):
                st = rng.choices(["sent", "pending", "dead"], [90, 7, 3])[0]
                outbox.append(dict(destination="pacs", sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                                   transfer_syntax="1.2.840.10008.1.2.1", study_uid=uid, study_version=1, kind=kind,
                                   path=f"{uid}/{sop}.dcm", state=st, attempts=1, next_attempt_at=t, created_at=t,
                                   sent_at=t if st == "sent" else None))
    with db.transaction() as s:
        for model, rows in ((Study, studies), (Instance, instances), (ImageResult, results), (OutboxItem, outbox)):
            for j in range(0, len(rows), 5000):
                s.execute(insert(model), rows[j:j + 5000])
    db.dispose()
    return time.perf_counter() - t0


def timed(c: Client, path: str) -> float:
    t0 = time.perf_counter()
    r = c.get(path)
    dt_ms = 1000 * (time.perf_counter() - t0)
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {r.text[:300]}")
    return dt_ms


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200, help="timed requests per page (after 10 warm-up)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="bench-web-") as tmp:
        root = Path(tmp)
        cfg = root / "cxr-node.toml"
        cfg.write_text(f'[storage]\ndata_dir = "{root / "data"}"\n[logging]\nlevel = "WARNING"\n')
        cli("db", "upgrade", config=cfg)
        took = seed(cfg, a.studies)
        print(f"seeded {a.studies} studies in {took:.1f}s")
        add_user(cfg, "bench", "viewer", "bench-password-1")
        web = WebConsole(cfg, root / "web.log").start()
        try:
            c = Client(web.url)
            assert c.login("bench", "bench-password-1").status == 303
            deep = max(1, a.studies // 50 - 2)
            pages = {"worklist": "/", "worklist_station": "/?station=DX-WARD-3",
                     "worklist_deep": f"/?page={deep}", "api": "/api/studies"}
            for path in list(pages.values()) * 3 + ["/healthz"] * 10:
                timed(c, path)
            times: dict[str, list[float]] = {k: [] for k in pages}
            ref: list[float] = []
            for _ in range(a.requests):
                for name, path in pages.items():
                    times[name].append(timed(c, path))
                    ref.append(timed(c, "/healthz"))
        finally:
            web.stop()
    print(f"{platform.node()} {platform.python_version()}, {a.studies} studies, {a.requests} requests per page, "
          "one at a time, alternating with the reference")
    rp95 = pct(ref, 0.95)
    print(f"{'page':18} {'p50 ms':>8} {'p95 ms':>8} {'ratio p95/ref':>14}")
    print(f"{'reference /healthz':18} {statistics.median(ref):8.1f} {rp95:8.1f} {1.0:14.2f}")
    for name, v in times.items():
        print(f"{name:18} {statistics.median(v):8.1f} {pct(v, 0.95):8.1f} {pct(v, 0.95) / rp95:14.2f}")
    ok = pct(times["worklist"], 0.95) < 300
    print(f"goal: worklist p95 < 300 ms: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
