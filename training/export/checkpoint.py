"""Export a (calibrated) checkpoint for bundling: ``python -m training.export --checkpoint RUN/best.pt
--out cxr_node/models/cxr-densenet121.pt --fp16``.

Drops the optimizer state, optionally halves the weights (fp16), recomputes the weights sha256 and
checks on ``--check-data`` films (optional) that the exported model's probabilities stay within
``--tolerance`` of the source checkpoint's; the largest difference is recorded in the metadata.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("training.export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fp16", action="store_true", help="store floating-point weights as float16")
    p.add_argument("--check-data", default=None, help="data to compare source and export on (e.g. the manifest)")
    p.add_argument("--check-split", default="val", help="split of --check-data to use (default val)")
    p.add_argument("--check-max", type=int, default=256, help="at most this many films for the check")
    p.add_argument("--tolerance", type=float, default=5e-3, help="max allowed probability difference")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def export(args: argparse.Namespace) -> dict:
    import torch

    from cxr_node.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from training.common import logits_for, split_records
    from training.evaluate.metrics import softmax

    if args.threads:
        torch.set_num_threads(args.threads)
    src = read_checkpoint(args.checkpoint)
    meta = dict(src["meta"])
    export_info = {"source_sha256": src["sha256"], "fp16": bool(args.fp16)}
    out = Path(args.out)
    save_checkpoint(out, src["state_dict"], dict(meta, export=export_info), fp16=args.fp16)
    if args.check_data:
        m0, meta0 = load_checkpoint(args.checkpoint)
        m1, _ = load_checkpoint(out)
        recs = split_records(args.check_data, Path(args.checkpoint), args.check_split, None, meta0["labels"])
        recs = recs[: args.check_max]
        device = torch.device("cpu")
        t = float(meta0["temperature"])
        p0 = softmax(logits_for(recs, m0, meta0["preprocess"], device, None), t)
        p1 = softmax(logits_for(recs, m1, meta0["preprocess"], device, None), t)
        diff = float(np.abs(p0 - p1).max())
        export_info.update({"check_films": len(recs), "check_split": args.check_split, "max_prob_diff": diff})
        log.info("export check on %d %s films: max probability difference %.2e", len(recs), args.check_split, diff)
        if diff > args.tolerance:
            out.unlink(missing_ok=True)
            raise SystemExit(f"exported model differs by {diff:.2e} > tolerance {args.tolerance}; not written")
        save_checkpoint(out, src["state_dict"], dict(meta, export=export_info), fp16=args.fp16)
    log.info("wrote %s (%.1f MB, weights %s)", out, out.stat().st_size / 1e6, "fp16" if args.fp16 else "fp32")
    return export_info


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    export(args)
    return 0
