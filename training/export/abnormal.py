"""Export the abnormality head (``python -m training.evaluate.abnormal export``): fitted on every source,
written with the bundled weights into a new checkpoint, and its gate beside it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from training.evaluate.abnormal.decide import TARGET_SENSITIVITY
from training.evaluate.abnormal.features import FEATURE_SETS, LAYERS, POOLS, Features
from training.evaluate.abnormal.heads import fit_abnormal, fit_gate

log = logging.getLogger("training.export.abnormal")

# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> dict:
    """The challenger's head fitted on every source (train split; L2 on the val split), at the shipped
    operating point of ``decide``, written with the bundled weights into a new checkpoint, and the gate
    refitted on every source beside it (NAME.ood.pt, bound to the new sha256)."""
    import torch

    from cxr_node.model.abnormality import AbnormalityHead
    from cxr_node.model.checkpoint import atomic_torch_save, make_checkpoint, read_verified
    from cxr_node.model.infer import OOD_KIND, default_ood_path
    from training.evaluate.lso.folds import read_rows

    dec = json.loads(Path(args.decision).read_text())
    ch = dec["challenger"]
    fset, pool = ch.split("-")
    threshold = float(dec["thresholds"][ch]["shipped"])
    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude")]
    F = Features(Path(args.features))
    sources = POOLS[pool]
    cand = [r for r in rows if r["id"] in F.index and (not sources or r["source"] in sources)]
    tr = [r for r in cand if r["split"] == "train"]
    va = [r for r in cand if r["split"] == "val"]
    fit = fit_abnormal(F, fset, tr, va)
    layers = tuple(LAYERS[part] for part in FEATURE_SETS[fset])
    rule = (f"cross-fitted leave-source-out (training/results/v5): the highest threshold at which the mean "
            f"per-source share of abnormal films flagged is >= {TARGET_SENSITIVITY:.2f} over every hold-out's "
            "held-out train+val films")
    head = AbnormalityHead(fit["head"], layers, threshold, rule)
    base = read_verified(F.checkpoint)
    meta = dict(base["meta"])
    meta.update(version=args.version, abnormality=head.meta(),
                based_on={"version": base["meta"]["version"], "sha256": base["sha256"]},
                abnormality_fit={"candidate": ch, "l2": fit["l2"], "n_train": fit["n_train"], "n_val": fit["n_val"],
                                 "train_cells": fit["train_cells"], "val_mean_source_auc": fit["val_mean_source_auc"],
                                 "decision": dec["decision"]})
    ck = make_checkpoint({**base["state_dict"], **head.state_tensors()}, meta)
    out = Path(args.out)
    atomic_torch_save(ck, out)
    gtr = [r for r in rows if r["id"] in F.index and r["split"] == "train"]
    gva = [r for r in rows if r["id"] in F.index and r["split"] == "val"]
    gate = fit_gate(F, gtr, gva)
    factor = float(dec["gate_crossfit"]["shipped_factor"]) if args.gate_rule == "crossfit" else 1.0
    registered = gate["threshold"]
    gate["threshold"] = registered * factor
    ref_meta = {"kind": OOD_KIND, "version": f"{args.version}-ood", "classifier_sha256": ck["sha256"],
                "classifier_version": args.version, "feature_layer": LAYERS["final"], "threshold": gate["threshold"],
                "method": "min Mahalanobis distance to a source x label cell mean, shared Ledoit-Wolf covariance",
                "cells": gate["cells"], "fit_films": gate["fit_films"], "percentile": gate["percentile"],
                "per_source_percentile": gate["per_source_percentile"], "rule": args.gate_rule,
                "registered_threshold": registered, "crossfit_factor": factor}
    sd = {"means": torch.tensor(gate["means"], dtype=torch.float32),
          "precision": torch.tensor(gate["precision"], dtype=torch.float32)}
    atomic_torch_save(make_checkpoint(sd, ref_meta), default_ood_path(out))
    info = {"checkpoint": str(out), "sha256": ck["sha256"], "threshold": threshold, "l2": fit["l2"],
            "gate_threshold": gate["threshold"], "gate_cells": len(gate["cells"])}
    log.info("wrote %s and %s: %s", out, default_ood_path(out), info)
    return info
