"""Probe families through the serving rules under each bundled gate (``probes``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from training.evaluate.abnormal.features import LAYERS

log = logging.getLogger("training.evaluate.abnormal")

# --------------------------------------------------------------------------- probes


def cmd_probes(args: argparse.Namespace) -> dict:
    """Every probe family (training.evaluate.probes) through the serving rules (lung fields, then the out-of-domain
    score), under each named checkpoint's gate; counts refused in all and by the score alone."""
    import torch

    from cxr_node.config import BUNDLED_LUNG_CHECKPOINT, BUNDLED_MODELS
    from cxr_node.eligibility.refusal import RefusalCode
    from cxr_node.eligibility.rules import pixel_reason
    from cxr_node.model.checkpoint import load_checkpoint
    from cxr_node.model.infer import OodReference, default_ood_path
    from cxr_node.model.lungs import LungSegmenter
    from training.evaluate.ood import features_and_lungs
    from training.evaluate.probes import write_probes

    torch.set_num_threads(args.threads)
    inv = sorted(Path(args.inversion_films).glob("*.png"))[:6] if args.inversion_films else []
    made = write_probes(Path(args.work), {"val": inv[:3], "test": inv[3:]},
                        dicom_samples=Path(args.dicom_samples) if args.dicom_samples else None,
                        laterals=Path(args.laterals) if args.laterals else None)
    seg = LungSegmenter(BUNDLED_LUNG_CHECKPOINT)
    model, meta = load_checkpoint(BUNDLED_MODELS["v2"])  # the same backbone under every gate
    refs = {name: OodReference(default_ood_path(BUNDLED_MODELS[name])) for name in args.models.split(",")}
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        for kind, paths in made[split].items():
            f, lungs, kept = features_and_lungs(paths[:40], model, meta["preprocess"], seg, LAYERS["final"], kind)
            row: dict[str, Any] = {"n": len(kept)}
            for name, ref in refs.items():
                sc = ref.score(torch.as_tensor(f))
                rs = [pixel_reason(lf, float(x), ref.threshold) for lf, x in zip(lungs, sc)]
                row[name] = sum(r is not None for r in rs)
                row[f"{name}_by_score"] = sum(r is not None and r.code == RefusalCode.OUT_OF_DOMAIN for r in rs)
            out[f"{split}: {kind}"] = row
            log.info("%s %s: %s", split, kind, row)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out
