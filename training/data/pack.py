"""Film packs: preprocessed films in one small file, to train where the source images are not.

A GPU machine lent for an hour rarely holds the source folders, and what travels to it is
limited. A pack holds every film of a manifest already through the serving preprocessing chain
(``cxr_node.model.preprocess``: LUTs, CLAHE, optional lung crop, resize) as an 8-bit image, encoded
losslessly (PNG) or as JPEG at a stated quality, keyed by the film's path as the manifest names
it. ``train``, ``calibrate``, ``evaluate`` and ``lso`` take ``--film-pack FILE`` and then read
films from the pack instead of the source images (the pack's preprocessing parameters must equal
the run's, or the run stops).

    # every train+val film of a merged manifest, lung crop at 224 px, covid19-radiography subsampled
    python -m training.data.pack build --manifest runs/v3/merged.csv --splits train,val \\
        --input-size 224 --preprocess 'lung_crop={"margin": 0.1, "segmenter_sha256": "..."}' \\
        --cap covid19-radiography:train=600 --cap covid19-radiography:val=150 \\
        --codec jpeg:92 --out runs/gpu/v3.pack.npz --manifest-out runs/gpu/v3.csv

``--cap SOURCE:SPLIT=N`` keeps at most N films per label of that source and split (seeded); the
films left out are marked ``exclude = not in pack`` in ``--manifest-out`` (they still join dedup
groups), so the written manifest and the pack describe the same films. A JPEG codec is lossy: it
is a stated deviation from the serving input, of the size of the v3 augmentation's own JPEG
re-compression; use ``png`` where the pack's size allows.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from training.data.filmpack import check_codec, encode_film, write_pack

log = logging.getLogger("training.data.pack")



def parse_caps(items: Sequence[str]) -> dict[tuple[str, str], int]:
    caps = {}
    for it in items:
        try:
            key, n = it.rsplit("=", 1)
            source, split = key.split(":", 1)
            caps[(source, split)] = int(n)
        except ValueError:
            raise SystemExit(f"--cap {it!r}: expected SOURCE:SPLIT=N, e.g. covid19-radiography:train=600") from None
    return caps


def choose(rows: Sequence[dict[str, str]], splits: Sequence[str], caps: Mapping[tuple[str, str], int],
           seed: int) -> set[int]:
    """Indices of the kept rows in ``splits``, at most ``caps[(source, split)]`` per label (seeded)."""
    by = defaultdict(list)
    for i, r in enumerate(rows):
        split = r.get("split") or ""
        if (r.get("exclude") or "").strip() or (split and split not in splits):
            continue  # rows without a split (a plain manifest) are always packed
        by[(r.get("source") or "", split, r["label"])].append(i)
    rng = random.Random(seed)
    chosen = set()
    for (source, split, _label), idx in sorted(by.items()):
        cap = caps.get((source, split))
        if cap is not None and len(idx) > cap:
            idx = sorted(rng.sample(idx, cap))
        chosen.update(idx)
    return chosen


def cmd_build(args: argparse.Namespace) -> int:
    from training.common import parse_preprocess
    from training.data import records as D

    manifest = Path(args.manifest).resolve()
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    splits = tuple(s for s in args.splits.split(",") if s)
    chosen = choose(rows, splits, parse_caps(args.cap), args.seed)
    params = parse_preprocess(args.preprocess, args.input_size)
    # keys are the manifest's paths made absolute, as training.data.records.Record.path and training.evaluate.lso name them
    keys = []
    for i in sorted(chosen):
        p = Path(rows[i]["path"].strip())
        keys.append(str(p if p.is_absolute() else manifest.parent / p))
    recs = [D.Record(k, "x", k, k) for k in keys]
    arr = D.build_cache(recs, params, Path(args.cache_dir) if args.cache_dir else Path(args.out).parent / "cache")
    images = [encode_film(np.asarray(a), args.codec) for a in arr]
    out = Path(args.out)
    write_pack(out, keys, images, params, args.codec)
    size = out.stat().st_size
    log.info("wrote %s: %d films, %.1f MB (%.1f kB per film, %s)", out, len(keys), size / 1e6,
             size / 1e3 / max(1, len(keys)), args.codec)
    if args.manifest_out:
        mo = Path(args.manifest_out)
        mo.parent.mkdir(parents=True, exist_ok=True)
        if "exclude" not in fields:
            fields.append("exclude")
        with open(mo, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for i, r in enumerate(rows):
                r = dict(r)
                p = Path(r["path"].strip())
                r["path"] = str(p if p.is_absolute() else manifest.parent / p)
                if i not in chosen and not (r.get("exclude") or "").strip():
                    r["exclude"] = "not in pack"
                w.writerow(r)
        log.info("wrote %s (the pack's films kept, every other row excluded)", mo)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.data.pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="preprocess a manifest's films into one pack file")
    b.add_argument("--manifest", required=True, help="manifest CSV (path,label,...; e.g. python -m training.data.sources build)")
    b.add_argument("--out", required=True, help="the pack file (.npz)")
    b.add_argument("--splits", default="train,val", help="builder splits to pack (default train,val)")
    b.add_argument("--cap", action="append", default=[], metavar="SOURCE:SPLIT=N",
                   help="at most N films per label of SOURCE in SPLIT (seeded subsample)")
    b.add_argument("--input-size", type=int, default=224)
    b.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="preprocessing parameters as for training.train")
    b.add_argument("--codec", type=check_codec, default="png", help="png (lossless, default) or jpeg:QUALITY")
    b.add_argument("--manifest-out", default=None, help="write the manifest with the unpacked rows excluded")
    b.add_argument("--cache-dir", default=None, help="uint8 cache folder (default: next to --out)")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return cmd_build(args)


if __name__ == "__main__":
    sys.exit(main())
