"""The v5 protocol's abnormality output (training/results/v5/PROTOCOL.md): "abnormal (any finding) vs
normal", asked within each hospital, as a logistic head on the bundled backbone's frozen features.

    # 1. every film once through the bundled model: pooled features of three layers, and its logits
    python -m training.abnormal extract --manifest runs/v5/merged.csv --out runs/v5/features.npz
    # 2. leave-source-out: the head (per feature set) and v2 scored by 1 - p(Normal), every hold-out
    python -m training.abnormal lso --manifest runs/v5/merged.csv --features runs/v5/features.npz \\
        --out training/results/v5/lso-trainval
    # 3. the final head on every source, written into a checkpoint beside the bundled weights
    python -m training.abnormal export --manifest ... --features ... --out cxr_node/models/cxr-densenet121-v5.pt

The target is ``Abnormal`` = any label that is not Normal / No Finding. A head is fitted only on
sources that hold both classes (the disease labels whose positives and negatives come from other
hospitals teach the hospital), with sample weights equal per source x class, L2 chosen by the fold's
pooled validation AUC. Feature sets: ``final`` (the pooled penultimate layer, what site heads use),
``multi`` (``final`` + the pooled outputs of dense blocks 2 and 3).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("training.abnormal")

NORMAL_LABELS = ("Normal", "No Finding")
#: Layers whose pooled outputs are extracted, by the names the feature sets use.
LAYERS = {"final": "class_layers.flatten", "block3": "features.denseblock3", "block2": "features.denseblock2"}
FEATURE_SETS = {"final": ("final",), "multi": ("final", "block3", "block2")}
#: The hold-outs whose AUC the protocol reads (sources holding both classes), and the normal-only ones.
AUC_HOLDOUTS = ("nih", "shenzhen", "ieee8023", "covid19-radiography")
NORMAL_ONLY_HOLDOUTS = ("openist",)
ABNORMAL_ONLY_HOLDOUTS = ("hannover",)
L2_GRID = (1000.0, 100.0, 10.0, 1.0)  # inverse of C = 0.001 .. 1
CAPS = {"covid19-radiography": {"train": 600, "val": 150, "test": 150}}


def is_abnormal(label: str) -> bool:
    return label not in NORMAL_LABELS


# --------------------------------------------------------------------------- extraction


def cmd_extract(args: argparse.Namespace) -> None:
    import torch

    from cxr_node.config import BUNDLED_CHECKPOINT
    from cxr_node.model.checkpoint import load_checkpoint
    from training import data as D
    from training.common import predict_logits
    from training.lso import read_rows

    torch.set_num_threads(args.threads)
    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude")]
    rng = np.random.default_rng(args.seed)
    drop: set[str] = set()
    for src, per_split in CAPS.items():
        for split, n in per_split.items():
            for lab in sorted({r["label"] for r in rows if r["source"] == src}):
                cell = [r for r in rows if r["source"] == src and r["split"] == split and r["label"] == lab]
                if len(cell) > n:
                    chosen = set(rng.choice(len(cell), n, replace=False).tolist())
                    drop |= {cell[i]["id"] for i in range(len(cell)) if i not in chosen}
    rows = [r for r in rows if r["id"] not in drop]
    ck = Path(args.checkpoint) if args.checkpoint else BUNDLED_CHECKPOINT
    model, meta = load_checkpoint(ck, torch.device("cpu"))
    modules = dict(model.named_modules())
    grabbed: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}

    def hook(name: str):
        def f(_m, _a, out):
            o = out.detach().float()
            if o.ndim == 4:
                o = o.mean(dim=(2, 3))
            grabbed[name].append(o.numpy().copy())
        return f

    for name, layer in LAYERS.items():
        modules[layer].register_forward_hook(hook(name))
    recs = [D.Record(r["abspath"], r["label"], r["group"], r["abspath"]) for r in rows]
    cache = D.build_cache(recs, meta["preprocess"], Path(args.cache_dir))
    log.info("%d films through %s", len(rows), meta["version"])
    logits = predict_logits(model, cache, range(len(recs)), meta["preprocess"], torch.device("cpu"), batch_size=64)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, ids=np.array([r["id"] for r in rows]), logits=logits.astype(np.float32),
                        labels=np.array(meta["labels"]), weights_sha256=np.array(str(meta["weights_sha256"])),
                        checkpoint=np.array(str(ck)), version=np.array(str(meta["version"])),
                        **{f"f_{k}": np.concatenate(v).astype(np.float32) for k, v in grabbed.items()})
    log.info("wrote %s: %s", out, {k: np.concatenate(v).shape for k, v in grabbed.items()})


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(prog="python -m training.abnormal", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="pooled features of three layers and the logits of the bundled model")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--cache-dir", default="runs/v5/cache")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    {"extract": cmd_extract}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
