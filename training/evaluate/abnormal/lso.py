"""Every candidate head and v2 on every hold-out (``lso``): predictions of all splits, the development
report and the candidate choice."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.evaluate.abnormal.features import AUC_HOLDOUTS, CANDIDATES, DEV, HOLDOUTS, Features, is_abnormal
from training.evaluate.abnormal.heads import fit_abnormal, fit_gate, fold_rows, gate_score, p_abnormal

log = logging.getLogger("training.evaluate.abnormal")

# --------------------------------------------------------------------------- leave-source-out


def cmd_lso(args: argparse.Namespace) -> dict:
    """Every candidate and v2 on every hold-out; predictions of all splits (the test ones are only read by
    ``decide``); the development report (train+val films) and the candidate choice. Candidates run one at a
    time in ``--candidates`` order, the files and the report rewritten after each (``--resume`` keeps the
    candidates already in them)."""
    import torch

    from cxr_node.model.infer import OodReference, default_ood_path
    from training.evaluate.lso.folds import read_rows

    rows = [r for r in read_rows(Path(args.manifest)) if not r.get("exclude")]
    F = Features(Path(args.features))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_path, test_path = out / "predictions-dev.csv", Path(args.test_out)
    folds_path = out / "folds.json"
    if args.resume and dev_path.is_file() and test_path.is_file():
        preds = read_csv(dev_path) + read_csv(test_path)
        folds = json.loads(folds_path.read_text())
    else:
        v2_gate = OodReference(default_ood_path(F.checkpoint), F.weights_sha256)
        preds, folds = [], {}
        for h in HOLDOUTS:
            pred, tr, va = fold_rows(rows, F, h)
            gate = fit_gate(F, tr, va)
            folds[h] = {"n_predicted": len(pred), "candidates": {},
                        "gate": {k: v for k, v in gate.items() if k not in ("means", "precision")}}
            gs = gate_score(gate, F.x("final", pred))
            v2g = v2_gate.score(torch.as_tensor(F.x("final", pred)))
            v2a, v2c = F.v2_scores(pred)
            for k, r in enumerate(pred):
                preds.append({"holdout": h, "id": r["id"], "source": r["source"], "site": r["site"],
                              "label": r["label"], "split": r["split"], "group": r["group"],
                              "abnormal": int(is_abnormal(r["label"])), "v2": f"{v2a[k]:.6f}",
                              "v2_covid": f"{v2c[k]:.6f}", "gate_refused": int(gs[k] > gate["threshold"]),
                              "gate_score": f"{gs[k]:.3f}", "v2_gate_refused": int(v2g[k] > v2_gate.threshold),
                              "v2_gate_score": f"{v2g[k]:.3f}"})
            log.info("hold-out %s: %d films, gate threshold %.1f", h, len(pred), gate["threshold"])
        _save(preds, folds, dev_path, test_path, folds_path)
    rep: dict[str, Any] = {}
    for cand in args.candidates.split(","):
        if cand in preds[0]:
            log.info("%s: already in %s", cand, dev_path)
            continue
        fset, pool = cand.split("-")
        for h in HOLDOUTS:
            pred, tr, va = fold_rows(rows, F, h, pool)
            fit = fit_abnormal(F, fset, tr, va)
            p = p_abnormal(fit["head"], F.x(fset, pred))
            score = dict(zip((r["id"] for r in pred), p))
            for r in preds:
                if r["holdout"] == h:
                    r[cand] = f"{score[r['id']]:.6f}"
            folds[h]["candidates"][cand] = {k: v for k, v in fit.items() if k != "head"}
            log.info("hold-out %s, %s: L2 %g, val mean-source AUC %.3f (%d train films)", h, cand, fit["l2"],
                     fit["val_mean_source_auc"], fit["n_train"])
        _save(preds, folds, dev_path, test_path, folds_path)
        rep = dev_report(preds, args.n_boot, out)
    return rep


def _save(preds: list[dict], folds: dict, dev_path: Path, test_path: Path, folds_path: Path) -> None:
    folds_path.write_text(json.dumps(plain(folds), indent=1) + "\n", encoding="utf-8")
    write_csv(dev_path, [r for r in preds if r["split"] in DEV])
    test_path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(test_path, [r for r in preds if r["split"] == "test"])  # not read until `decide`


def dev_report(preds: Sequence[dict], n_boot: int, out: Path) -> dict:
    """Development figures (held-out train+val films) of every candidate present and v2, and the choice."""
    dev = [r for r in preds if r["split"] in DEV]
    done = [c for c in CANDIDATES if c in dev[0]]
    rep: dict[str, Any] = {"films": "held-out train+val films (development)", "candidates_run": done,
                           "candidates_not_run": [c for c in CANDIDATES if c not in done], "candidates": {}}
    for c in (*done, "v2"):
        rep["candidates"][c] = pooled_auc(dev, c, n_boot)
    rep["challenger"] = max(done, key=lambda c: rep["candidates"][c]["pooled"]["auc"])
    rep["rule"] = "highest pooled abnormal AUC over the four AUC hold-outs' train+val films (PROTOCOL.md)"
    (out / "report.json").write_text(json.dumps(plain(rep), indent=1) + "\n", encoding="utf-8")
    log.info("challenger so far: %s", rep["challenger"])
    return rep


def plain(x: Any) -> Any:
    from cxr_node.model.calibration import json_safe

    return json_safe(x)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _auc(rows: Sequence[dict], col: str, n_boot: int, seed: int = 0) -> dict:
    from cxr_node.model.calibration import bootstrap_binary_auc

    y = np.array([r["abnormal"] == "1" or r["abnormal"] == 1 for r in rows])
    s = np.array([float(r[col]) for r in rows])
    g = np.array([f'{r["source"]}/{r["group"]}' for r in rows])
    return bootstrap_binary_auc(y, s, n_boot=n_boot, seed=seed, groups=g)


def pooled_auc(rows: Sequence[dict], col: str, n_boot: int) -> dict:
    auc_rows = [r for r in rows if r["holdout"] in AUC_HOLDOUTS]
    return {"pooled": _auc(auc_rows, col, n_boot),
            "per_holdout": {h: _auc([r for r in auc_rows if r["holdout"] == h], col, n_boot) for h in AUC_HOLDOUTS}}
