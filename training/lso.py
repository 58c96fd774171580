"""Leave-source-out (LSO) evaluation: how a model does on a hospital / source it never saw.

    # train one model per held-out source, predict that source, report (see --help of each)
    python -m training.lso run --manifest runs/merged.csv --out runs/lso-v3 \\
        --holdout hannover --holdout nih --holdout ieee8023 \\
        --train-arg=--input-size=128 --train-arg=--epochs=2 --max-per-source-class 300
    # a fixed checkpoint (e.g. the bundled v2 model) on the same held-out sources, no training
    python -m training.lso evaluate --checkpoint cxr_node/models/cxr-densenet121.pt \\
        --manifest runs/merged.csv --out training/results/v2-other-sources \\
        --holdout hannover --holdout nih --holdout ieee8023 --seen-source covid19-radiography
    # re-make the report from predictions CSVs
    python -m training.lso report --predictions runs/lso-v3/predictions.csv --out runs/lso-v3
    # operating points chosen on leave-source-out predictions: each hold-out judged with the
    # temperature and threshold fitted on the other hold-outs' predictions
    python -m training.lso crossfit --predictions runs/lso-v3/predictions.csv --out runs/lso-v3-crossfit \\
        --target-sensitivity 0.70 --sensitivity-rule wilson

The manifest is a merged one (``python -m training.sources build``). A hold-out is a source name
(``nih``: the sites that source holds most films of, from any folder), ``site:SITE`` (e.g. ``site:ieee8023/Italy``) or ``ieee8023-countries`` (every ieee8023
country with at least 10 COVID and 4 other films). For each hold-out, ``run``:

1. takes the held-out films: the kept rows of that source or site in ``--holdout-splits`` of the
   builder's split (default ``train,val``: a held-out source's test split stays closed until the
   shipping decision is made; ``--holdout-splits test`` predicts it once afterwards);
2. trains on the other kept rows of the train split (validation: their val split; their test split
   is never read), leaving out every row whose dedup group (patient, near-duplicate, cross-folder
   copy) also holds a held-out film, and every row from the held-out site(s);
   ``--train-source`` keeps only those sources (e.g. the v2 recipe: covid19-radiography only),
   ``--max-per-source-class N`` subsamples (seeded) for cheap runs;
3. fits temperature and the critical-class threshold on that validation split (calibrate's rules);
4. predicts the held-out films and writes ``HOLDOUT/predictions.csv``.

Both commands then write ``report.json`` and ``README.md`` tables. For each hold-out: COVID films
flagged urgent (sensitivity at the operating threshold), non-COVID films not called COVID (argmax)
and not flagged urgent, per label, the urgent rate on Normal films, the within-source COVID AUC;
pooled over hold-outs: the COVID-vs-rest AUC, the urgent rate on normals, the COVID urgent rate
and the calibration error of the COVID probability (binary ECE) and of the top label (films whose
label the model knows). Proportions carry Wilson 95% intervals, AUCs patient-group bootstrap 95%
intervals. The issue's goals are checked at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("training.lso")

CRITICAL = "COVID"
NORMAL = "Normal"
GOALS = {"pooled_covid_auc_min": 0.80, "urgent_on_normals_max": 0.20, "covid_flagged_min": 0.70,
         "ece_max": 0.05}


# --------------------------------------------------------------------------- selection


def read_rows(manifest: Path) -> list[dict[str, str]]:
    if not Path(manifest).is_file():
        raise SystemExit(f"{manifest}: no such manifest; build one with python -m training.sources build")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"path", "label", "source", "site", "group", "split", "id"}
    if not rows or not need <= set(rows[0]):
        raise SystemExit(f"{manifest}: not a merged manifest (needs {', '.join(sorted(need))}); "
                         "build one with python -m training.sources build")
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
        for (src, lab, split), rs in sorted(cells.items()):
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
    from training.data import Record
    from training.metrics import softmax

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
    keep = _splits(splits)
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


def _has(r: dict[str, str], c: str) -> bool:
    """Whether the row's model has critical class ``c`` (its threshold column is filled)."""
    return bool((r.get(f"threshold_{c}") or "").strip())


# --------------------------------------------------------------------------- metrics


def _block(preds: Sequence[dict[str, str]], labels: Sequence[str], critical: str, n_boot: int, seed: int) -> dict:
    from training.metrics import bootstrap_binary_auc, proportion

    y_c = np.array([r["label"] == critical for r in preds])
    p_c = np.array([float(r[f"p_{critical}"]) for r in preds])
    urgent = np.array([r["urgent"] == "1" for r in preds])
    top_c = np.array([r["top"] == critical for r in preds])
    groups = np.array([r["group"] for r in preds])
    out: dict[str, Any] = {"n": len(preds), "labels": dict(sorted(Counter(r["label"] for r in preds).items()))}
    if y_c.any():
        out["covid_flagged_urgent"] = proportion(urgent[y_c])
        out["covid_top_class"] = proportion(top_c[y_c])
    per_label = {}
    for lab in sorted({r["label"] for r in preds} - {critical}):
        m = np.array([r["label"] == lab for r in preds])
        per_label[lab] = {"not_called_covid": proportion(~top_c[m]), "not_flagged_urgent": proportion(~urgent[m]),
                          "called": dict(Counter(r["top"] for r, k in zip(preds, m) if k).most_common())}
    if per_label:
        out["non_covid"] = per_label
    normal = np.array([r["label"] == NORMAL for r in preds])
    if normal.any():
        out["urgent_on_normals"] = proportion(urgent[normal])
    if y_c.any() and (~y_c).any():
        out["covid_auc"] = bootstrap_binary_auc(y_c, p_c, n_boot=n_boot, seed=seed, groups=groups)
    # the other critical classes (e.g. Tuberculosis): flagged share of their films, and their AUC
    # against every other film where the model has the class
    for c in prediction_criticals(preds):
        if c == critical:
            continue
        y = np.array([r["label"] == c for r in preds])
        has = np.array([_has(r, c) for r in preds])
        d: dict[str, Any] = {}
        if y.any():
            d["flagged_urgent"] = proportion(urgent[y])
            d["films_whose_model_lacks_the_class"] = int((y & ~has).sum())
        if (y & has).any() and (~y & has).any():
            pc = np.array([float(r[f"p_{c}"]) for r in preds])
            d["auc"] = bootstrap_binary_auc(y[has], pc[has], n_boot=n_boot, seed=seed, groups=groups[has])
        if (~y & has).any():
            d["others_flagged_by_it"] = proportion(np.array([float(r[f"p_{c}"]) >= float(r[f"threshold_{c}"])
                                                             for r, k in zip(preds, ~y & has) if k]))
        if d:
            out.setdefault("other_critical", {})[c] = d
    return out


def report(preds: Sequence[dict[str, str]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The LSO report over prediction rows (from one or several hold-outs)."""
    from training.metrics import binary_ece, expected_calibration_error

    if not preds:
        raise ValueError("no predictions")
    labels, critical = prediction_columns(preds)
    out: dict[str, Any] = {"model_labels": labels, "critical": critical, "per_holdout": {}}
    by_h: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in preds:
        by_h[r["holdout"]].append(r)
    for h, rs in by_h.items():
        out["per_holdout"][h] = _block(rs, labels, critical, n_boot, seed)
        # per site inside a hold-out (e.g. ieee8023's countries), where counts allow
        by_site: dict[str, list[dict[str, str]]] = defaultdict(list)
        for r in rs:
            by_site[r["site"]].append(r)
        sites = {s: _block(v, labels, critical, n_boot, seed) for s, v in sorted(by_site.items())
                 if len(by_site) > 1 and sum(x["label"] == critical for x in v) >= 10
                 and sum(x["label"] != critical for x in v) >= 4}
        if sites:
            out["per_holdout"][h]["per_site"] = sites
    pooled = _block(preds, labels, critical, n_boot, seed)
    y_c = np.array([r["label"] == critical for r in preds])
    p_c = np.array([float(r[f"p_{critical}"]) for r in preds])
    pooled["ece_covid_binary"] = binary_ece(y_c, p_c)
    for c in prediction_criticals(preds):
        has = [r for r in preds if _has(r, c)]
        if c != critical and has and any(r["label"] == c for r in has):
            pooled.setdefault("ece_binary", {})[c] = binary_ece(np.array([r["label"] == c for r in has]),
                                                                np.array([float(r[f"p_{c}"]) for r in has]))
    known = [r for r in preds if model_knows(r, labels)]
    if known:
        P = np.array([[float(r[f"p_{n}"]) for n in labels] for r in known])
        y = np.array([labels.index(r["label"]) for r in known])
        pooled["ece_top_label"] = expected_calibration_error(y, P)[0]
        pooled["ece_top_label_n"] = len(known)
    out["pooled"] = pooled
    out["goals"] = check_goals(pooled, out["per_holdout"])
    return out


def check_goals(pooled: dict[str, Any], per_holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """The issue's goals. The pooled AUC mixes sources (a COVID-only hold-out against a normal-only
    one rewards telling sources apart), so the within-source AUC of every hold-out that has both
    classes is checked too; that is the stricter figure."""
    g: dict[str, Any] = {}
    auc = pooled.get("covid_auc", {}).get("auc")
    g["pooled_covid_auc >= 0.80"] = None if auc is None else bool(auc >= GOALS["pooled_covid_auc_min"])
    within = [b["covid_auc"]["auc"] for b in (per_holdout or {}).values()
              if "covid_auc" in b and not math.isnan(b["covid_auc"]["auc"])]
    g["within_source_covid_auc >= 0.80 (every hold-out with both classes)"] = (
        None if not within else bool(min(within) >= GOALS["pooled_covid_auc_min"]))
    un, cf = pooled.get("urgent_on_normals"), pooled.get("covid_flagged_urgent")
    g["urgent_on_normals <= 0.20 with covid_flagged >= 0.70"] = (
        None if not un or not cf else bool(un["rate"] <= GOALS["urgent_on_normals_max"]
                                          and cf["rate"] >= GOALS["covid_flagged_min"]))
    g["ece_covid_binary <= 0.05"] = bool(pooled["ece_covid_binary"] <= GOALS["ece_max"])
    return g


def _pct(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['rate']:.3f} ({d['k']}/{d['n']}) [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def _auc(d: dict | None) -> str:
    if not d or d["auc"] is None or (isinstance(d["auc"], float) and math.isnan(d["auc"])):
        return "-"
    return f"{d['auc']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] ({d['n_pos']} vs {d['n_neg']})"


def markdown(rep: dict[str, Any]) -> str:
    lines = ["| hold-out | n | COVID flagged urgent | urgent on Normal | within-source COVID AUC |",
             "|---|---|---|---|---|"]
    for h, b in list(rep["per_holdout"].items()) + [("**pooled**", rep["pooled"])]:
        lines.append(f"| {h} | {b['n']} | {_pct(b.get('covid_flagged_urgent'))} | {_pct(b.get('urgent_on_normals'))} "
                     f"| {_auc(b.get('covid_auc'))} |")
    site_lines = [f"| {h} / {s} | {b['n']} | {_pct(b.get('covid_flagged_urgent'))} | "
                  f"{_pct((b.get('non_covid') or {}).get('Other pneumonia', {}).get('not_flagged_urgent'))} | "
                  f"{_auc(b.get('covid_auc'))} |"
                  for h, hb in rep["per_holdout"].items() for s, b in (hb.get("per_site") or {}).items()]
    if site_lines:
        lines += ["", "| hold-out / site | n | COVID flagged urgent | Other pneumonia not flagged | "
                  "within-site COVID AUC |", "|---|---|---|---|---|", *site_lines]
    lines += ["", "| hold-out | label | not called COVID (argmax) | not flagged urgent |", "|---|---|---|---|"]
    for h, b in rep["per_holdout"].items():
        for lab, d in (b.get("non_covid") or {}).items():
            lines.append(f"| {h} | {lab} | {_pct(d['not_called_covid'])} | {_pct(d['not_flagged_urgent'])} |")
    other = [(h, c, d) for h, b in list(rep["per_holdout"].items()) + [("**pooled**", rep["pooled"])]
             for c, d in (b.get("other_critical") or {}).items()]
    if other:
        lines += ["", "| hold-out | critical class | its films flagged urgent | of them, the model lacks the class | "
                  "AUC (vs every other film) | other films flagged by it |", "|---|---|---|---|---|---|"]
        lines += [f"| {h} | {c} | {_pct(d.get('flagged_urgent'))} | {d.get('films_whose_model_lacks_the_class', '-')} "
                  f"| {_auc(d.get('auc'))} | {_pct(d.get('others_flagged_by_it'))} |" for h, c, d in other]
    called = [(h, lab, d["called"]) for h, b in rep["per_holdout"].items()
              for lab, d in (b.get("non_covid") or {}).items() if d.get("called")]
    if called:
        lines += ["", "| hold-out | label | called (top class) |", "|---|---|---|"]
        lines += [f"| {h} | {lab} | {', '.join(f'{k} {v}' for k, v in c.items())} |" for h, lab, c in called]
    p = rep["pooled"]
    for c, e in (p.get("ece_binary") or {}).items():
        lines += ["", f"Binary ECE of p({c}) over the films whose model has it: {e:.3f}"]
    lines += ["", "The pooled AUC mixes sources: a hold-out with only COVID films (hannover) against one with "
              "only non-COVID films (nih) rewards telling the sources apart. The within-source AUC (a "
              "hold-out with both classes) is the cleaner figure."]
    lines += ["", f"Pooled calibration: binary ECE of p({rep['critical']}) {p['ece_covid_binary']:.3f}"
              + (f"; top-label ECE {p['ece_top_label']:.3f} on {p['ece_top_label_n']} films with a model label"
                 if "ece_top_label" in p else ""), "", "Goals: " + "; ".join(
                     f"{k}: {'met' if v else ('not met' if v is False else 'n/a')}" for k, v in rep["goals"].items())]
    return "\n".join(lines) + "\n"


def write_report(out: Path, preds: Sequence[dict[str, str]], extra: dict[str, Any], n_boot: int) -> dict:
    rep = report(preds, n_boot=n_boot)
    rep.update(extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(rep), encoding="utf-8")
    log.info("wrote %s\n%s", out / "report.json", markdown(rep))
    return rep


# --------------------------------------------------------------------------- cross-fitted operating points


def crossfit(preds: Sequence[dict[str, str]], target: float, rule: str = "wilson", margin: float = 0.0,
             temperature: bool = True, extra_fit: dict[str, Sequence[dict[str, str]]] | None = None
             ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Operating points chosen on leave-source-out predictions, judged on a source they never saw.

    For each hold-out H, a temperature (multi-class NLL over the films with a model label) and each
    critical class's threshold (``rule`` at ``target`` sensitivity, as ``training.calibrate``) are
    fitted on the pooled predictions of the *other* hold-outs only, then applied to H's predictions.
    The returned rows are H's films re-scored that way (``urgent``: any critical class at or above
    its threshold, ``threshold_*``, ``p_*``), so :func:`report` reads them as it reads a fold's own.
    ``info["all"]`` is the same fit on every hold-out: the operating point a model trained on all
    sources would ship with.

    A critical class other than the first whose films lie in no other hold-out (Tuberculosis: every
    film is Shenzhen's) takes its threshold from ``extra_fit[class]`` (prediction rows of that class's
    own grouped cross-validation, re-scaled with the same temperature) when given, else from each
    fold's own validation threshold (recorded as such)."""
    from cxr_node.model.calibration import fit_temperature, logits_from, softmax, threshold_for_sensitivity_rule

    if not preds:
        raise ValueError("no predictions")
    labels, critical = prediction_columns(preds)
    crits = prediction_criticals(preds)
    extra_fit = extra_fit or {}
    P = np.array([[float(r[f"p_{n}"]) for n in labels] for r in preds])
    logit = logits_from(P, 1.0)
    holdout = np.array([r["holdout"] for r in preds])
    known = np.array([model_knows(r, labels) for r in preds])
    y = np.array([labels.index(r["label"]) if r["label"] in labels else -1 for r in preds])
    is_c = {c: np.array([r["label"] == c for r in preds]) for c in crits}
    has_c = {c: np.array([_has(r, c) for r in preds]) for c in crits}
    extra = {c: (np.array([r["label"] == c for r in rows]),
                 logits_from(np.array([[float(r.get(f"p_{n}") or 0.0) for n in labels] for r in rows]), 1.0))
             for c, rows in extra_fit.items()}

    def fit(m: np.ndarray) -> dict[str, Any]:
        k = m & known
        t = fit_temperature(logit[k], y[k]) if temperature and k.sum() >= 2 and len(set(y[k])) > 1 else 1.0
        if not is_c[critical][m].any():
            raise SystemExit(f"cross-fit: no {critical} films outside the hold-out(s) "
                             f"{sorted(set(holdout) - set(holdout[m]))} to set the threshold on")
        res: dict[str, Any] = {"temperature": float(t), "fitted_on_films": int(m.sum()),
                               "fitted_on_critical": int(is_c[critical][m].sum()),
                               "fitted_on_holdouts": sorted(set(holdout[m])), "thresholds": {}, "how": {}}
        for c in crits:
            ci = labels.index(c)
            mc = m & has_c[c]
            if is_c[c][mc].any():
                pc = softmax(logit[mc], t)[:, ci]
                res["thresholds"][c] = float(threshold_for_sensitivity_rule(is_c[c][mc], pc, target, rule, margin))
                res["how"][c] = f"other hold-outs ({int(is_c[c][mc].sum())} {c} films)"
            elif c in extra and extra[c][0].any():
                ye, le = extra[c]
                res["thresholds"][c] = float(threshold_for_sensitivity_rule(ye, softmax(le, t)[:, ci], target, rule,
                                                                            margin))
                res["how"][c] = f"its own grouped cross-validation ({int(ye.sum())} {c} films)"
            else:
                res["how"][c] = "each fold's own validation threshold (no such films elsewhere)"
        res["threshold"] = res["thresholds"].get(critical, float("nan"))
        return res

    out_rows: list[dict[str, str]] = []
    info: dict[str, Any] = {"target_sensitivity": target, "sensitivity_rule": rule, "margin": margin,
                            "temperature": temperature, "per_holdout": {}}
    for h in dict.fromkeys(holdout.tolist()):
        f = fit(holdout != h)
        info["per_holdout"][h] = f
        idx = np.flatnonzero(holdout == h)
        p = softmax(logit[idx], f["temperature"])
        for i, row in zip(idx, p):
            r = dict(preds[i])
            r.update({f"p_{n}": f"{v:.6f}" for n, v in zip(labels, row)})
            urgent = False
            for c in crits:
                if not has_c[c][i]:
                    continue
                th = f["thresholds"].get(c, float(preds[i][f"threshold_{c}"]))
                r[f"threshold_{c}"] = f"{th:.6f}"
                urgent |= bool(row[labels.index(c)] >= th)
            r["urgent"] = str(int(urgent))
            r["top"] = labels[int(row.argmax())]
            out_rows.append(r)
    info["all"] = fit(np.ones(len(preds), bool))
    return out_rows, info


def crossfit_markdown(info: dict[str, Any]) -> str:
    lines = ["", f"Operating points cross-fitted over hold-outs (target sensitivity {info['target_sensitivity']}, "
             f"rule {info['sensitivity_rule']}, temperature {'fitted' if info['temperature'] else 'not fitted'}): "
             "each hold-out's temperature and threshold come from the other hold-outs' predictions only.", "",
             "| applied to | fitted on | films (COVID) | temperature | COVID threshold |", "|---|---|---|---|---|"]
    for h, f in list(info["per_holdout"].items()) + [("(shipping: all)", info["all"])]:
        lines.append(f"| {h} | {', '.join(f['fitted_on_holdouts'])} | {f['fitted_on_films']} "
                     f"({f['fitted_on_critical']}) | {f['temperature']:.3f} | {f['threshold']:.4f} |")
    others = [(h, c, f["thresholds"].get(c), f["how"][c]) for h, f in
              list(info["per_holdout"].items()) + [("(shipping: all)", info["all"])]
              for c in f.get("how", {}) if c != "COVID"]
    if others:
        lines += ["", "| applied to | critical class | threshold | fitted on |", "|---|---|---|---|"]
        lines += [f"| {h} | {c} | {'-' if th is None else f'{th:.4f}'} | {how} |" for h, c, th, how in others]
    return "\n".join(lines) + "\n"


def cmd_crossfit(args: argparse.Namespace) -> dict:
    preds = read_predictions_in([Path(p) for p in args.predictions], args.splits)
    extra = {}
    for item in args.fit_critical:
        c, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--fit-critical {item!r}: expected CLASS=PREDICTIONS.csv")
        extra[c] = read_predictions([Path(path)])
    rows, info = crossfit(preds, args.target_sensitivity, args.sensitivity_rule, args.margin,
                          temperature=not args.no_temperature, extra_fit=extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in preds for k in r))  # files from before a column existed lack it
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
    rep = write_report(out, rows, {"command": "crossfit", "predictions": [str(p) for p in args.predictions],
                                   "splits": args.splits, "crossfit": info}, args.n_boot)
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write(crossfit_markdown(info))
    log.info("%s", crossfit_markdown(info))
    return rep


# --------------------------------------------------------------------------- commands


def calibrate_fold(checkpoint: Path, fold_manifest: Path, split_file: Path, device: str, cache_dir: str | None,
                   threads: int | None, target: float, rule: str, margin: float) -> dict:
    """Temperature + critical threshold on the fold's validation split, written into the checkpoint."""
    ns = argparse.Namespace(checkpoint=str(checkpoint), data=str(fold_manifest), out=None, split_file=str(split_file),
                            split="val", critical=None, target_sensitivity=target, sensitivity_rule=rule,
                            margin=margin, lso_predictions=None, device=device, threads=threads, cache_dir=cache_dir)
    from training.calibrate import calibrate

    return calibrate(ns)


def cmd_run(args: argparse.Namespace) -> dict:
    from training import train as T

    manifest = Path(args.manifest).resolve()
    rows = read_rows(manifest)
    out = Path(args.out).resolve()
    holdouts = expand_holdouts(args.holdout, rows)
    labels = args.labels.split(",") if args.labels else None
    # one header for every fold's predictions: every label and critical class the recipe trains on
    all_labels = labels or sorted({r["label"] for r in rows if not r.get("exclude")})
    targs0 = T.build_parser().parse_args(["--data", "-", "--out", "-", *args.train_arg])
    from training.train import critical_classes

    criticals = critical_classes(targs0.critical, all_labels, warn=False)
    pred_files = []
    folds = {}
    for h in holdouts:
        test = held_out(h, rows, _splits(args.holdout_splits))
        fold = out / h.replace("site:", "site-").replace("/", "-").replace(" ", "_")
        # training leaves out the whole hold-out (every split), its groups and its sites
        train_rows = training_rows(rows, held_out(h, rows), args.train_source, labels, args.max_per_source_class,
                                   args.seed)
        fm = write_fold_manifest(train_rows, fold / "train-manifest.csv")
        counts = Counter((r["split"], r["source"], r["label"]) for r in train_rows)
        log.info("hold-out %s: %d films held out; training on %d (%s)", h, len(test), len(train_rows),
                 ", ".join(f"{s}:{src}/{lab}={n}" for (s, src, lab), n in sorted(counts.items())))
        pf = fold / "predictions.csv"
        if args.resume and pf.is_file():
            log.info("hold-out %s: done in an earlier run (%s): kept", h, pf)
            pred_files.append(pf)
            done = fold / "fold.json"
            if done.is_file():
                folds[h] = json.loads(done.read_text(encoding="utf-8"))
            continue
        resume = ["--resume"] if args.resume and (fold / "run" / "last.pt").is_file() else []
        targs = T.build_parser().parse_args(["--data", str(fm), "--out", str(fold / "run"), *args.train_arg, *resume])
        t0 = time.perf_counter()
        res = T.train(targs)
        ck = fold / "run" / "best.pt"
        cal = calibrate_fold(ck, fm, fold / "run" / "split.csv", targs.device, targs.cache_dir, targs.threads,
                             args.target_sensitivity, args.sensitivity_rule, args.margin)
        test_keep = list(test)  # every held-out film, also those with labels the model lacks
        meta, p = predict(ck, test_keep, targs.device, targs.cache_dir, targs.threads)
        write_predictions(pf, h, test_keep, p, meta, all_labels, criticals)
        pred_files.append(pf)
        folds[h] = {"n_test": len(test_keep), "n_train": len(train_rows),
                    "best_val_macro_auc": res["best_val_macro_auc"],
                    "epochs": res["epochs"], "temperature": cal["temperature"],
                    "thresholds": {k: v["threshold"] for k, v in cal["operating_points"].items()},
                    "seconds": round(time.perf_counter() - t0, 1)}
        (fold / "fold.json").write_text(json.dumps(folds[h], indent=2) + "\n", encoding="utf-8")
    preds = read_predictions(pred_files)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in preds for k in r)), restval="")
        w.writeheader()
        w.writerows(preds)
    extra = {"command": "run", "manifest": str(manifest), "holdouts": holdouts, "holdout_splits": args.holdout_splits,
             "train_args": args.train_arg,
             "train_sources": args.train_source, "labels": labels, "max_per_source_class": args.max_per_source_class,
             "seed": args.seed, "folds": folds}
    return write_report(out, preds, extra, args.n_boot)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    manifest = Path(args.manifest).resolve()
    rows = read_rows(manifest)
    out = Path(args.out).resolve()
    holdouts = expand_holdouts(args.holdout, rows)
    seen = set(args.seen_source)
    # films that the checkpoint may have seen: kept copies of a seen source's film (duplicate_of),
    # and with --seen-by groups, everything sharing a group (patient) with a seen source's film
    copy_of_seen = {r["duplicate_of"] for r in rows if r["source"] in seen and r.get("duplicate_of")}
    seen_groups = {r["group"] for r in rows if r["source"] in seen}
    pred_files, dropped = [], {}
    for h in holdouts:
        test = held_out(h, rows, _splits(args.holdout_splits))
        if h in seen or any(r["source"] in seen for r in test):
            raise SystemExit(f"hold-out {h} is a source the checkpoint was trained on (--seen-source)")
        keep = [r for r in test if r["id"] not in copy_of_seen
                and (args.seen_by == "copies" or r["group"] not in seen_groups)]
        dropped[h] = len(test) - len(keep)
        log.info("hold-out %s: %d films, %d left out as seen by the checkpoint (%s)", h, len(test), dropped[h],
                 args.seen_by)
        meta, p = predict(Path(args.checkpoint), keep, args.device, args.cache_dir, args.threads)
        pf = out / (h.replace("site:", "site-").replace("/", "-").replace(" ", "_") + "-predictions.csv")
        write_predictions(pf, h, keep, p, meta)
        pred_files.append(pf)
    preds = read_predictions(pred_files)
    extra = {"command": "evaluate", "holdout_splits": args.holdout_splits, "checkpoint": str(args.checkpoint),
             "model_version": meta.get("version"),
             "weights_sha256": meta.get("weights_sha256"), "manifest": str(manifest), "holdouts": holdouts,
             "seen_sources": sorted(seen), "seen_by": args.seen_by, "left_out_as_seen": dropped,
             "thresholds": meta.get("thresholds"), "temperature": meta.get("temperature")}
    return write_report(out, preds, extra, args.n_boot)


def _splits(text: str) -> tuple[str, ...]:
    sp = tuple(x.strip() for x in text.split(",") if x.strip())
    if not sp or set(sp) - {"train", "val", "test"}:
        raise SystemExit(f"--holdout-splits {text!r}: a comma-separated subset of train,val,test")
    return sp


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m training.lso", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--manifest", required=True, help="merged manifest (python -m training.sources build)")
    common.add_argument("--out", required=True, help="output folder (report.json, report.md, predictions)")
    common.add_argument("--holdout", action="append", required=True,
                        help="source name, site:SITE, or ieee8023-countries; repeat for several")
    common.add_argument("--holdout-splits", default="train,val",
                        help="which of the builder's splits of a held-out source are predicted (default train,val: "
                        "the test split stays closed until the decision; 'test' once afterwards)")
    common.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for AUC intervals")
    common.add_argument("--film-pack", default=None, metavar="FILE", help="read preprocessed films from this pack (python -m training.pack) instead of the source images")
    common.add_argument("--log-level", default="INFO")
    r = sub.add_parser("run", parents=[common], help="train without each hold-out, predict it, report",
                       description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--train-source", action="append", default=[],
                   help="train only on these sources (default: every source but the hold-out)")
    r.add_argument("--labels", default=None, help="train only on films with these labels (comma-separated)")
    r.add_argument("--max-per-source-class", type=int, default=None, metavar="N",
                   help="cheap runs: at most N training films per source and label (val: 0.15/0.70 of N)")
    r.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="passed to training.train, e.g. --train-arg=--epochs=2 --train-arg=--augment=v3")
    r.add_argument("--target-sensitivity", type=float, default=0.95, help="critical-class threshold target on val")
    r.add_argument("--sensitivity-rule", choices=["point", "margin", "wilson"], default="point")
    r.add_argument("--margin", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=42, help="subsampling seed")
    r.add_argument("--resume", action="store_true",
                   help="keep hold-outs whose predictions.csv exists; continue a hold-out's training from its "
                        "last.pt (for long CPU runs that stop and start)")
    rp = sub.add_parser("report", help="re-make report.json / report.md from predictions CSVs (no model)")
    rp.add_argument("--predictions", nargs="+", required=True, help="predictions CSVs written by run or evaluate")
    rp.add_argument("--out", required=True)
    rp.add_argument("--splits", default="train,val,test",
                    help="report only predictions of films in these builder splits (default all; rows without a "
                    "split, from runs before the column existed, count as train)")
    rp.add_argument("--n-boot", type=int, default=1000)
    rp.add_argument("--log-level", default="INFO")
    cf = sub.add_parser("crossfit", help="operating points chosen on the other hold-outs' predictions, judged on "
                        "each hold-out (no model)")
    cf.add_argument("--predictions", nargs="+", required=True, help="predictions CSVs of at least two hold-outs")
    cf.add_argument("--out", required=True)
    cf.add_argument("--target-sensitivity", type=float, default=0.70,
                    help="critical-class sensitivity the threshold aims at (default 0.70, the issue's floor)")
    cf.add_argument("--sensitivity-rule", choices=["point", "margin", "wilson"], default="wilson")
    cf.add_argument("--margin", type=float, default=0.0)
    cf.add_argument("--no-temperature", action="store_true", help="keep each fold's own temperature")
    cf.add_argument("--fit-critical", action="append", default=[], metavar="CLASS=CSV",
                    help="a critical class whose films lie in one hold-out only (Tuberculosis) takes its threshold "
                    "from these predictions (its grouped cross-validation, e.g. training.frozen's shenzhen-cv)")
    cf.add_argument("--splits", default="train,val,test",
                    help="use only predictions of films in these builder splits (default all; rows without a "
                    "split column count as train)")
    cf.add_argument("--n-boot", type=int, default=1000)
    cf.add_argument("--log-level", default="INFO")
    e = sub.add_parser("evaluate", parents=[common], help="one fixed checkpoint on the hold-outs (no training)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--seen-source", action="append", default=[],
                   help="source(s) the checkpoint was trained on: their films' copies are left out")
    e.add_argument("--seen-by", choices=["copies", "groups"], default="copies",
                   help="leave out copies of seen films (default) or every film sharing a dedup group "
                   "(patient, near-duplicate) with one")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--cache-dir", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if getattr(args, "film_pack", None):
        from training import data as D

        D.use_pack(args.film_pack)
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "report":
        preds = read_predictions_in([Path(p) for p in args.predictions], args.splits)
        write_report(Path(args.out), preds, {"command": "report", "predictions": [str(p) for p in args.predictions],
                                             "holdout_splits": args.splits}, args.n_boot)
    elif args.cmd == "crossfit":
        cmd_crossfit(args)
    else:
        cmd_evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
