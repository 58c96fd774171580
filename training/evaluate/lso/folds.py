"""Leave-source-out folds: which films a hold-out holds, what its fold trains on, and the predictions' files."""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("training.evaluate.lso")

CRITICAL = "COVID"
NORMAL = "Normal"
GOALS = {"pooled_covid_auc_min": 0.80, "urgent_on_normals_max": 0.20, "covid_flagged_min": 0.70,
         "ece_max": 0.05}


# --------------------------------------------------------------------------- selection


def read_rows(manifest: Path) -> list[dict[str, str]]:
    if not Path(manifest).is_file():
        raise SystemExit(f"{manifest}: no such manifest; build one with python -m training.data.sources build")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"path", "label", "source", "site", "group", "split", "id"}
    if not rows or not need <= set(rows[0]):
        raise SystemExit(f"{manifest}: not a merged manifest (needs {', '.join(sorted(need))}); "
                         "build one with python -m training.data.sources build")
    root = manifest.parent
    for r in rows:
        p = Path(r["path"])
        r["abspath"] = str(p if p.is_absolute() else (root / p).resolve())
    return rows


def expand_holdouts(specs: Sequence[str], rows: Sequence[dict[str, str]]) -> list[str]:
    out: list[str] = []
    kept = [r for r in rows if not r.get("exclude")]
    for s in specs:
        if s == "ieee8023-countries":
            c = Counter((r["site"], r["label"] == CRITICAL) for r in kept if r["site"].startswith("ieee8023/"))
            sites = sorted({site for site, _ in c})
            out += [f"site:{site}" for site in sites if c[(site, True)] >= 10 and c[(site, False)] >= 4
                    and not site.endswith("/unknown")]
        else:
            out.append(s)
    return out


def held_out(spec: str, rows: Sequence[dict[str, str]], splits: Sequence[str] = ("train", "val", "test")
             ) -> list[dict[str, str]]:
    """The held-out films of ``spec`` in the builder's ``splits`` (all, by default).

    A source's hold-out is every kept film of the sites that source holds most films of, from any
    folder: ``hannover`` also takes ieee8023's Hannover Medical School films, and ``ieee8023``
    leaves them to it, so a hospital is never on both sides of a fold."""
    all_kept = [r for r in rows if not r.get("exclude")]
    if spec.startswith("site:"):
        sites = {spec[5:]}
    else:
        by_site: dict[str, Counter] = defaultdict(Counter)
        for r in all_kept:
            by_site[r["site"]][r["source"]] += 1
        sites = {site for site, c in by_site.items() if c.most_common(1)[0][0] == spec}
    sel = [r for r in all_kept if r["site"] in sites and r["split"] in splits]
    if not sel:
        known = sorted({r["source"] for r in all_kept})
        raise SystemExit(f"hold-out {spec!r} matches no kept film (sources: {', '.join(known)}; "
                         "or site:SITE with a site of the manifest)")
    return sel


def training_rows(rows: Sequence[dict[str, str]], test: Sequence[dict[str, str]], train_sources: Sequence[str],
                  labels: Sequence[str] | None, max_per: int | None, seed: int) -> list[dict[str, str]]:
    """Kept train/val rows not sharing a group or site with ``test``, filtered and subsampled."""
    bad_groups = {r["group"] for r in test}
    bad_sites = {r["site"] for r in test}
    sel = [r for r in rows if not r.get("exclude") and r["split"] in ("train", "val")
           and r["group"] not in bad_groups and r["site"] not in bad_sites
           and (not train_sources or r["source"] in train_sources) and (not labels or r["label"] in labels)]
    if max_per:
        rng = np.random.default_rng(seed)
        cells: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
        for r in sel:
            cells[(r["source"], r["label"], r["split"])].append(r)
        out = []
        for (_src, _lab, split), rs in sorted(cells.items()):
            cap = max_per if split == "train" else max(2, math.ceil(max_per * 0.15 / 0.70))
            if len(rs) > cap:
                rs = [rs[i] for i in sorted(rng.choice(len(rs), cap, replace=False))]
            out += rs
        sel = out
    return sel


def write_fold_manifest(rows: Sequence[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source", "site", "group", "split"])
        for r in rows:
            w.writerow([r["abspath"], r["label"], r["source"], r["site"], r["group"], r["split"]])
    return path


# --------------------------------------------------------------------------- prediction


def predict(checkpoint: Path, rows: Sequence[dict[str, str]], device: str, cache_dir: str | None,
            threads: int | None) -> tuple[dict, np.ndarray]:
    """Probabilities (temperature-scaled) of ``checkpoint`` for ``rows``: (meta, (N, K))."""
    import torch

    from cxr_node.model.checkpoint import load_checkpoint, resolve_device
    from training.common import logits_for
    from training.data.records import Record
    from training.evaluate.metrics import softmax

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, dev)
    recs = [Record(r["abspath"], r["label"], r["group"], r["abspath"]) for r in rows]
    logits = logits_for(recs, model, meta["preprocess"], dev, cache_dir)
    return meta, softmax(logits, float(meta["temperature"]))


def write_predictions(path: Path, holdout: str, rows: Sequence[dict[str, str]], p: np.ndarray, meta: dict,
                      all_labels: Sequence[str] | None = None, criticals: Sequence[str] | None = None) -> None:
    """One row per film: ``p_*`` for ``all_labels`` (default the model's; a label the model lacks gets
    0, e.g. Tuberculosis in a fold trained without Shenzhen), ``threshold_*`` for each critical class in
    ``criticals`` (default the model's; empty where the model lacks that class), ``urgent`` when any
    critical class the model has reaches its threshold. Files of folds with different label sets
    thus share one header."""
    labels = list(meta["labels"])
    out_labels = list(all_labels or labels)
    crits = list(criticals or meta.get("critical_labels") or [CRITICAL])
    thr = {c: float((meta.get("thresholds") or {}).get(c, 0.5)) for c in crits if c in labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["holdout", "id", "label", "raw_label", "source", "site", "group", "split", "top", "urgent",
                    *[f"threshold_{c}" for c in crits], *[f"p_{n}" for n in out_labels], "model_labels"])
        for r, row in zip(rows, p):
            urgent = any(row[labels.index(c)] >= t for c, t in thr.items())
            w.writerow([holdout, r["id"], r["label"], r.get("raw_label", r["label"]), r["source"], r["site"],
                        r["group"], r["split"], labels[int(row.argmax())], int(urgent),
                        *[f"{thr[c]:.6f}" if c in thr else "" for c in crits],
                        *[f"{row[labels.index(n)]:.6f}" if n in labels else "0.000000" for n in out_labels],
                        ";".join(labels)])


def read_predictions(paths: Sequence[Path]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for p in paths:
        with open(p, newline="", encoding="utf-8") as f:
            out += list(csv.DictReader(f))
    return out


def read_predictions_in(paths: Sequence[Path], splits: str) -> list[dict[str, str]]:
    """The rows of films in ``splits`` (comma-separated builder splits); rows without a split, from
    runs before the column existed, count as train. Refuses an empty result."""
    keep = holdout_splits(splits)
    preds = [r for r in read_predictions(paths) if (r.get("split") or "train") in keep]
    if not preds:
        raise SystemExit(f"no predictions in splits {splits}")
    return preds


def prediction_columns(preds: Sequence[dict[str, str]]) -> tuple[list[str], str]:
    """(model labels, critical label) named by a predictions file's ``p_*`` and ``threshold_*`` columns."""
    labels = [c[2:] for c in preds[0] if c.startswith("p_")]
    critical = next((c[len("threshold_"):] for c in preds[0] if c.startswith("threshold_")), CRITICAL)
    return labels, critical


def prediction_criticals(preds: Sequence[dict[str, str]]) -> list[str]:
    """Every critical class a predictions file names (its ``threshold_*`` columns), COVID first."""
    return [c[len("threshold_"):] for c in preds[0] if c.startswith("threshold_")] or [CRITICAL]


def model_knows(r: dict[str, str], labels: Sequence[str]) -> bool:
    """Whether the row's film has a label its model was trained on (``model_labels``; files without
    that column: the ``p_*`` labels)."""
    known = r.get("model_labels")
    return r["label"] in (known.split(";") if known else labels)


def has_threshold(r: dict[str, str], c: str) -> bool:
    """Whether the row's model has critical class ``c`` (its threshold column is filled)."""
    return bool((r.get(f"threshold_{c}") or "").strip())

def holdout_splits(text: str) -> tuple[str, ...]:
    sp = tuple(x.strip() for x in text.split(",") if x.strip())
    if not sp or set(sp) - {"train", "val", "test"}:
        raise SystemExit(f"--holdout-splits {text!r}: a comma-separated subset of train,val,test")
    return sp
