"""Local performance: how right the model is at this site, from the films readers labelled.

Everything comes from the database rows the audit trail mirrors: each analysed film's
probabilities, top class and urgent flag (``image.triaged``) and the label in force for it
(``feedback.added``: a label for the film, else for its study). The JSON lists every film used,
so the figures can be recomputed by anyone.

* per class (one vs rest, the predicted class is the top class): sensitivity, specificity, PPV, NPV
  with Wilson 95% intervals, and AUC of the class probability with a percentile bootstrap interval;
* the confusion matrix (rows: the reader's label, ``Other`` included; columns: the top class);
* the expected calibration error of the top class (a film labelled ``Other`` counts as wrong);
* the urgent flag against the critical classes: precision, recall (sensitivity), specificity;
* on a model with an abnormality output, the abnormal axis: p(abnormal)'s AUC against the readers'
  labels (every label but Normal is abnormal), the urgent flag's recall and specificity.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import func, select

from cxr_node.db.models import Feedback, ImageResult
from cxr_node.model.calibration import json_safe, rate
from cxr_node.onboarding.feedback import ABNORMAL, OTHER

#: Below this many films of a class (or its negatives), its figures are called too few to mean much.
FEW = 20


@dataclass
class LabelledFilm:
    study_uid: str
    sop_instance_uid: str
    station: str | None
    model_version: str | None
    calibration: str | None
    temperature: float | None
    probabilities: dict[str, float]
    top_label: str
    urgent: bool
    label: str
    feedback_id: int
    image_result_id: int
    created_at: dt.datetime
    abnormal: float | None = None  # p(abnormal) as triaged (models with an abnormality output)


def labelled_films(session, *, station: str | None = None, since: dt.datetime | None = None,
                   until: dt.datetime | None = None, model_version: str | None = None) -> list[LabelledFilm]:
    """The newest analysis of every film that has a label in force (its own, else its study's)."""
    labelled = select(Feedback.study_uid).where(Feedback.superseded_at.is_(None))
    # only studies with a label in force: the cost follows the labelled films, not every film analysed
    newest = select(func.max(ImageResult.id)).where(ImageResult.analysed.is_(True),
                                                    ImageResult.study_uid.in_(labelled))
    if station is not None:
        newest = newest.where(ImageResult.station == station)
    if model_version is not None:
        newest = newest.where(ImageResult.model_version == model_version)
    if since is not None:
        newest = newest.where(ImageResult.created_at >= since)
    if until is not None:
        newest = newest.where(ImageResult.created_at < until)
    newest = newest.group_by(ImageResult.sop_instance_uid)
    rows = list(session.scalars(select(ImageResult).where(ImageResult.id.in_(newest)).order_by(ImageResult.id)))
    if not rows:
        return []
    studies = {r.study_uid for r in rows}
    labels: dict[tuple[str, str | None], Feedback] = {}
    for fb in session.scalars(select(Feedback).where(Feedback.superseded_at.is_(None),
                                                     Feedback.study_uid.in_(studies)).order_by(Feedback.id)):
        labels[(fb.study_uid, fb.sop_instance_uid)] = fb
    out = []
    for r in rows:
        fb = labels.get((r.study_uid, r.sop_instance_uid)) or labels.get((r.study_uid, None))
        if fb is None:
            continue
        out.append(LabelledFilm(r.study_uid, r.sop_instance_uid, r.station, r.model_version, r.calibration,
                                r.temperature, dict(r.probabilities or {}), r.top_label, bool(r.urgent), fb.label,
                                fb.id, r.id, r.created_at, r.abnormal))
    return out


def compute(films: Sequence[LabelledFilm], labels: Sequence[str], critical: Sequence[str],
            n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    from cxr_node.model.calibration import bootstrap_binary_auc, expected_calibration_error

    labels = list(labels)
    scored = [f for f in films if f.abnormal is not None]
    everything, films = films, [f for f in films if f.label != ABNORMAL]  # "Abnormal" names no class
    report: dict[str, Any] = {"films": len(films), "labels": labels, "critical_labels": list(critical)}
    if len(films) < len(everything):
        report["abnormal_only"] = len(everything) - len(films)
    if scored:  # a model with an abnormality output: the urgent flag is p(abnormal)'s
        report["abnormal_axis"] = abnormal_axis(scored, n_boot, seed)
    truth_names = labels + [OTHER]
    counts = {name: sum(f.label == name for f in films) for name in truth_names}
    report["counts"] = counts
    if not films:
        report["too_few"] = "no analysed film has a label yet: import feedback first (cxr-node feedback import)"
        return report
    y = np.array([labels.index(f.label) if f.label in labels else -1 for f in films])
    p = np.array([[float(f.probabilities.get(n, 0.0)) for n in labels] for f in films])
    pred = np.array([labels.index(f.top_label) if f.top_label in labels else int(np.argmax(p[i]))
                     for i, f in enumerate(films)])
    per_class = {}
    few = []
    for k, name in enumerate(labels):
        pos, hit = y == k, pred == k
        tp, fp = int((pos & hit).sum()), int((~pos & hit).sum())
        fn, tn = int((pos & ~hit).sum()), int((~pos & ~hit).sum())
        auc = bootstrap_binary_auc(pos, p[:, k], n_boot=n_boot, seed=seed)
        per_class[name] = {"positives": int(pos.sum()), "negatives": int((~pos).sum()),
                           "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                           "sensitivity": rate(tp, tp + fn), "specificity": rate(tn, tn + fp),
                           "ppv": rate(tp, tp + fp), "npv": rate(tn, tn + fn),
                           "auc": {"value": auc["auc"], "ci95": auc["ci95"], "n_boot": n_boot, "seed": seed}}
        if pos.sum() < FEW or (~pos).sum() < FEW:
            few.append(f"{name} ({int(pos.sum())} labelled, {int((~pos).sum())} not)")
    report["per_class"] = per_class
    cm = [[int(((y == (labels.index(t) if t in labels else -1)) & (pred == c)).sum()) for c in range(len(labels))]
          for t in truth_names]
    report["confusion_matrix"] = {"rows": truth_names, "columns": labels, "counts": cm,
                                  "axes": "rows = the reader's label, columns = the model's top class"}
    ece, table = expected_calibration_error(y, p)
    report["ece"] = {"value": ece, "bins": len(table["count"]), "reliability": table}
    crit = [labels.index(c) for c in critical if c in labels]
    flag_true = np.isin(y, crit)
    flagged = np.array([f.urgent for f in films])
    tp, fp = int((flag_true & flagged).sum()), int((~flag_true & flagged).sum())
    fn, tn = int((flag_true & ~flagged).sum()), int((~flag_true & ~flagged).sum())
    report["urgent_flag"] = {"truth": f"reader's label in {', '.join(critical)}", "tp": tp, "fp": fp, "fn": fn,
                             "tn": tn, "precision": rate(tp, tp + fp), "recall": rate(tp, tp + fn),
                             "specificity": rate(tn, tn + fp)}
    if few:
        report["too_few"] = (f"too few films to mean much for: {', '.join(few)}; fewer than {FEW} on either side "
                             "gives intervals too wide to act on (see ci95)")
    report["calibrations"] = sorted({f.calibration or "model" for f in films})
    if len(report["calibrations"]) > 1:  # e.g. the model's, a site calibration's and a site head's films
        report["per_calibration"] = per_calibration(films, labels, critical, n_boot, seed)
    report["model_versions"] = sorted({f.model_version or "-" for f in films})
    report["films_used"] = [{"study_uid": f.study_uid, "sop_instance_uid": f.sop_instance_uid, "station": f.station,
                             "label": f.label, "feedback_id": f.feedback_id, "top_label": f.top_label,
                             "urgent": f.urgent, "probabilities": f.probabilities,
                             "image_result_id": f.image_result_id} for f in films]
    return json_safe(report)


def abnormal_axis(films: Sequence[LabelledFilm], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """p(abnormal) against the readers' labels on the abnormal axis (every label but Normal is
    abnormal): its AUC, and the urgent flag's recall and specificity."""
    import numpy as np

    from cxr_node.model.calibration import bootstrap_binary_auc
    from cxr_node.onboarding.feedback import is_abnormal

    y = np.array([bool(is_abnormal(f.label)) for f in films])
    flagged = np.array([f.urgent for f in films])
    auc = bootstrap_binary_auc(y, np.array([float(f.abnormal) for f in films]), n_boot=n_boot, seed=seed)
    return {"abnormal": int(y.sum()), "normal": int((~y).sum()),
            "auc": {"value": auc["auc"], "ci95": auc["ci95"], "n_boot": n_boot, "seed": seed},
            "urgent_recall": rate(int((y & flagged).sum()), int(y.sum())),
            "urgent_specificity": rate(int((~y & ~flagged).sum()), int((~y).sum()))}


def per_calibration(films: Sequence[LabelledFilm], labels: Sequence[str], critical: Sequence[str],
                    n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The urgent flag and each critical class's AUC, separately for the films triaged with each
    calibration ("model", "site X vN", "site X head vN"): before and after a site calibration or
    site head, on the films each actually decided."""
    import numpy as np

    from cxr_node.model.calibration import bootstrap_binary_auc

    out: dict[str, Any] = {}
    for name in sorted({f.calibration or "model" for f in films}):
        fs = [f for f in films if (f.calibration or "model") == name]
        truth = np.array([f.label in critical for f in fs])
        flagged = np.array([f.urgent for f in fs])
        d: dict[str, Any] = {"films": len(fs), "urgent_recall": rate(int((truth & flagged).sum()), int(truth.sum())),
                             "urgent_specificity": rate(int((~truth & ~flagged).sum()), int((~truth).sum())),
                             "auc": {}}
        for c in critical:
            pos = np.array([f.label == c for f in fs])
            if pos.any() and (~pos).any():
                a = bootstrap_binary_auc(pos, np.array([float(f.probabilities.get(c, 0.0)) for f in fs]),
                                         n_boot=n_boot, seed=seed)
                d["auc"][c] = {"value": a["auc"], "ci95": a["ci95"], "positives": int(pos.sum()),
                               "negatives": int((~pos).sum())}
        out[name] = d
    return out


def _fmt_rate(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['value']:.3f} [{lo:.2f}-{hi:.2f}] ({r['k']}/{r['n']})"


def _write_abnormal(report: dict[str, Any], out) -> None:
    ab = report.get("abnormal_axis")
    if not ab:
        return
    a = ab["auc"]
    auc = "-" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.2f}-{a['ci95'][1]:.2f}]"
    out.write(f"abnormal axis ({ab['abnormal']} abnormal, {ab['normal']} normal; every label but Normal is abnormal): "
              f"p(abnormal) AUC {auc}; urgent recall {_fmt_rate(ab['urgent_recall'])}, specificity "
              f"{_fmt_rate(ab['urgent_specificity'])}\n")


def write_table(report: dict[str, Any], out, header: str = "") -> None:
    if header:
        out.write(header + "\n")
    counts = report.get("counts", {})
    out.write(f"films with a label: {report['films']}  ("
              + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")\n")
    if report.get("films", 0) == 0:
        out.write(report.get("too_few", "") + "\n")
        _write_abnormal(report, out)
        return
    out.write("per class (predicted = the model's top class; 95% intervals: Wilson, AUC bootstrap):\n")
    out.write(f"  {'class':16} {'sensitivity':28} {'specificity':28} {'PPV':28} {'NPV':28} AUC\n")
    for name, c in report["per_class"].items():
        auc = c["auc"]
        a = "-" if auc["value"] is None else f"{auc['value']:.3f} [{auc['ci95'][0]:.2f}-{auc['ci95'][1]:.2f}]"
        out.write(f"  {name:16} {_fmt_rate(c['sensitivity']):28} {_fmt_rate(c['specificity']):28} "
                  f"{_fmt_rate(c['ppv']):28} {_fmt_rate(c['npv']):28} {a}\n")
    cm = report["confusion_matrix"]
    out.write("confusion matrix (rows: reader's label, columns: model's top class):\n")
    out.write("  " + " " * 16 + "".join(f"{c[:14]:>15}" for c in cm["columns"]) + "\n")
    for name, row in zip(cm["rows"], cm["counts"]):
        out.write(f"  {name:16}" + "".join(f"{v:>15}" for v in row) + "\n")
    ece = report["ece"]["value"]
    out.write(f"ECE (top class, {report['ece']['bins']} bins): {'-' if ece is None else f'{ece:.3f}'}\n")
    u = report["urgent_flag"]
    out.write(f"urgent flag vs {u['truth']}: precision {_fmt_rate(u['precision'])}, recall {_fmt_rate(u['recall'])}, "
              f"specificity {_fmt_rate(u['specificity'])}\n")
    _write_abnormal(report, out)
    for name, d in (report.get("per_calibration") or {}).items():
        aucs = ", ".join(f"{c} AUC {a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] ({a['positives']} vs "
                         f"{a['negatives']})" for c, a in d["auc"].items()
                         if a.get("value") is not None and a.get("ci95") and None not in a["ci95"])
        out.write(f"triaged with {name}: {d['films']} film(s); urgent recall {_fmt_rate(d['urgent_recall'])}, "
                  f"specificity {_fmt_rate(d['urgent_specificity'])}" + (f"; {aucs}" if aucs else "") + "\n")
    if report.get("too_few"):
        out.write(f"NOTE: {report['too_few']}\n")


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """roc.png, reliability.png, confusion.png (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cxr_node.model.calibration import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = report["labels"]
    films = report.get("films_used", [])
    written = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in labels:
        y = np.array([f["label"] == name for f in films])
        if y.any() and (~y).any():
            s = np.array([f["probabilities"].get(name, 0.0) for f in films])
            fpr, tpr, _ = roc_curve(y, s)
            auc = report["per_class"][name]["auc"]["value"]
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.2f}, n+={int(y.sum())})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC at this site")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "roc.png")

    rel = report["ece"]["reliability"]
    fig, ax = plt.subplots(figsize=(5, 5))
    pts = [(c, a, n) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if c is not None]
    if pts:
        ax.scatter([c for c, _, _ in pts], [a for _, a, _ in pts], s=[10 + 2 * n for _, _, n in pts])
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="confidence of the top class", ylabel="share correct", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {report['ece']['value']:.3f})")
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "reliability.png")

    cm = report["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    a = np.array(cm["counts"])
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(len(cm["columns"])), cm["columns"], rotation=30, ha="right")
    ax.set_yticks(range(len(cm["rows"])), cm["rows"])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, str(a[i, j]), ha="center", va="center")
    ax.set(xlabel="model's top class", ylabel="reader's label", title="confusion")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "confusion.png")
    return written
