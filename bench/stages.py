"""Where a film's seconds go, stage by stage, in process: the bundled model on RG1_UNCR (pydicom-data's
1955x1841 CR), warmed up first as the daemon is, medians of --repeats.

Stages, as the worker runs them: decode the spooled file, prepare (LUTs, CLAHE, the lung segmenter,
the crop, resize), predict with Grad-CAM (and the out-of-domain score), build the Secondary Capture
(heat map, headline, at ``--sc-max-rows``), encode it as Part 10, write it with fsync (the outbox's
durability), build the SR and encode it. What this leaves out, and the daemon adds: the database
transaction, the C-STORE of each object, and the PACS storing it (``bench/e2e.py``, ``bench/sched.py``).

    .venv/bin/python bench/stages.py [--repeats 6] [--sc-max-rows 2048] [--model v2]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--sc-max-rows", type=int, default=2048)
    ap.add_argument("--model", default="v2", help="a bundled model's name")
    args = ap.parse_args()

    import torch
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from cxr_node.config import BUNDLED_LUNG_CHECKPOINT
    from cxr_node.config.bundled import BUNDLED_MODELS
    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.encode.sc import build_sc
    from cxr_node.encode.sr import AnalysedFilm, build_sr
    from cxr_node.model.infer import Predictor
    from cxr_node.model.lungs import LungSegmenter
    from cxr_node.model.preprocess import prepare
    from cxr_node.study.warmup import warm_up

    src = get_testdata_file("RG1_UNCR.dcm")
    predictor = Predictor(BUNDLED_MODELS[args.model], device="cpu")
    seg = LungSegmenter(BUNDLED_LUNG_CHECKPOINT, device=predictor.device)
    identity = ModelIdentity.from_meta(predictor.meta)
    warm_up(predictor, seg, identity, args.sc_max_rows)
    times: dict[str, list[float]] = {k: [] for k in ("decode", "prepare", "predict + Grad-CAM", "SC build",
                                                      "SC encode", "SC write + fsync", "SR build + encode")}
    out = Path(tempfile.mkdtemp(prefix="cxr-stages-"))
    size = 0

    @contextlib.contextmanager
    def clock(stage: str):
        t0 = time.perf_counter()
        yield
        times[stage].append(time.perf_counter() - t0)

    for i in range(args.repeats):
        with clock("decode"):
            ds = dcmread(src)
            ds.pixel_array  # noqa: B018 - the decode is the point
        with clock("prepare"):
            pr = prepare(ds, predictor.params, seg)
        with clock("predict + Grad-CAM"):
            pred = predictor.policy.apply(list(predictor.predict([pr.x], explain=True))[0])
        film = pr.film if pr.film is not None else pr.display
        with clock("SC build"):
            sc = build_sc(ds, film, pred, identity, instance_number=1, box=pr.box,
                          lung_mask=pr.lungs.mask if pr.lungs is not None else None, max_rows=args.sc_max_rows)
        buf = io.BytesIO()
        with clock("SC encode"):
            sc.save_as(buf, enforce_file_format=True)
        size = len(buf.getvalue())
        with clock("SC write + fsync"), open(out / f"{i}.dcm", "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        with clock("SR build + encode"):
            doc = build_sr([AnalysedFilm(ds, sc, pred)], identity, study_version=1, predecessor=None, refused=[])
            doc.save_as(io.BytesIO(), enforce_file_format=True)
    for f in out.iterdir():
        f.unlink()
    out.rmdir()

    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    print(f"\nstages of one film {dt.date.today()} on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}): RG1_UNCR 1955x1841, model {args.model}, SC at most "
          f"{args.sc_max_rows} rows ({size / 1e6:.1f} MB), medians of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:<20} {v:6.3f} s  {100 * v / total:4.0f}%")
    print(f"  {'in all':<20} {total:6.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
