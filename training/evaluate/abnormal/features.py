"""The v5 head's inputs: what counts as abnormal, the hold-outs the protocol reads, and the pooled
features of three layers of the bundled backbone (``extract``), read back as :class:`Features`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("training.evaluate.abnormal")

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
    from training.common import predict_logits
    from training.data import records as D
    from training.evaluate.lso.folds import read_rows

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


# --------------------------------------------------------------------------- heads and folds

POOLS = {"all": None, "within": AUC_HOLDOUTS}
CANDIDATES = tuple(f"{fs}-{pool}" for fs in FEATURE_SETS for pool in POOLS)
HOLDOUTS = AUC_HOLDOUTS + NORMAL_ONLY_HOLDOUTS + ABNORMAL_ONLY_HOLDOUTS
DEV = ("train", "val")


class Features:
    """The extracted features: ids -> rows of each feature set, and v2's softmax (its temperature)."""

    def __init__(self, path: Path) -> None:
        from cxr_node.model.calibration import softmax
        from training.evaluate.frozen import bundled_meta

        z = np.load(path)
        self.ids = [str(x) for x in z["ids"]]
        self.index = {i: k for k, i in enumerate(self.ids)}
        self.sets = {name: np.concatenate([z[f"f_{part}"] for part in parts], axis=1).astype(np.float64)
                     for name, parts in FEATURE_SETS.items()}
        self.labels = [str(x) for x in z["labels"]]
        self.checkpoint = Path(str(z["checkpoint"]))
        self.bundled = bundled_meta(self.checkpoint)
        self.v2 = softmax(z["logits"].astype(np.float64), self.bundled["temperature"])
        self.weights_sha256 = str(z["weights_sha256"])

    def x(self, name: str, rows: Sequence[dict]) -> np.ndarray:
        return self.sets[name][[self.index[r["id"]] for r in rows]]

    def v2_scores(self, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        p = self.v2[[self.index[r["id"]] for r in rows]]
        return 1.0 - p[:, self.labels.index("Normal")], p[:, self.labels.index("COVID")]
