"""Site onboarding: the cost of finding a station's labelled films (what `cxr-node performance`,
`calibrate-site` and the console's Stations page read), as the node fills with unlabelled films.

Fills a fresh SQLite database (migrated to head) with --films analysed films of one station, one
study each, of which every --label-every-th study has a reader's label, then times, alternating:

    labelled   performance.labelled_films(station=...)   (the node's query: labelled studies first)
    reference  the newest analysis of *every* film of the station, the same rows read without the
               label restriction (what the query cost before it looked at the labels first)

It prints the median milliseconds of each and the ratio labelled / reference: the smaller, the
less the page pays for films nobody has labelled.

    .venv/bin/python bench/stations.py [--films 20000] [--label-every 100] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--films", type=int, default=20000)
    p.add_argument("--label-every", type=int, default=100, help="one study in N has a label (default 100: 1%%)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    from sqlalchemy import func, select

    from cxr_node.onboarding import performance
    from cxr_node.db.migrate import upgrade
    from cxr_node.db.models import Feedback, ImageResult, utcnow
    from cxr_node.db.session import Database

    url = f"sqlite:///{tempfile.mkdtemp(prefix='cxr-bench-stations-')}/cxr-node.db"
    upgrade(url)
    db = Database(url)
    now = utcnow()
    with db.transaction() as s:
        for i in range(args.films):
            study = f"1.2.826.0.1.3680043.10.9.{i}"
            s.add(ImageResult(study_uid=study, study_version=1, sop_instance_uid=f"{study}.1", analysed=True,
                              model_version="bench", top_label="Normal", urgent=False, priority="routine",
                              probabilities={"COVID": 0.2, "Normal": 0.8}, station="CR-ROOM-1", created_at=now))
            if i % args.label_every == 0:
                s.add(Feedback(study_uid=study, label="Normal", reader="bench", source="bench", labelled_at=now,
                               recorded_at=now))

    def labelled(s) -> int:  # noqa: ANN001
        return len(performance.labelled_films(s, station="CR-ROOM-1"))

    def reference(s) -> int:  # noqa: ANN001
        newest = (select(func.max(ImageResult.id)).where(ImageResult.analysed.is_(True),
                                                         ImageResult.station == "CR-ROOM-1")
                  .group_by(ImageResult.sop_instance_uid))
        return len(list(s.scalars(select(ImageResult).where(ImageResult.id.in_(newest)))))

    times: dict[str, list[float]] = {"labelled": [], "reference": []}
    counts = {}
    with db.session() as s:
        for _ in range(args.repeats):
            for name, fn in (("labelled", labelled), ("reference", reference)):
                t = time.perf_counter()
                counts[name] = fn(s)
                times[name].append(1000 * (time.perf_counter() - t))
    db.dispose()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{platform.node()} python {platform.python_version()}: {args.films} films, "
          f"{counts['labelled']} labelled, median of {args.repeats}")
    print(f"  labelled   {med['labelled']:8.1f} ms  ({counts['labelled']} films)")
    print(f"  reference  {med['reference']:8.1f} ms  ({counts['reference']} films read)")
    print(f"  ratio labelled / reference: {med['labelled'] / med['reference']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
