"""Merge several chest X-ray sources into one manifest with grouped splits.

    python -m training.data.sources build --source covid19-radiography=/data/covid19-radiography \\
        --source hannover=/data/hannover-covid --source nih=/data/nih-chestxray8-subset \\
        --source ieee8023=/data/ieee8023-covid-chestxray --out runs/merged.csv
    python -m training.data.sources build --source mine=/data/tb-tree --out runs/tb.csv   # plain tree

A source is a folder with a ``manifest.csv`` (path,label plus optional columns), a manifest CSV
itself, or a plain folder-per-class tree (``DIR/<label>/*.png``) with no manifest. Six source
*kinds* are known by their name (``--kind NAME=KIND`` names it explicitly): ``covid19-radiography``,
``hannover``, ``nih``, ``ieee8023``, ``shenzhen`` and ``openist``; anything else is ``generic`` (labels kept as written).

Output columns: ``path`` (absolute, or relative to the manifest's folder with ``--relative``),
``id`` (``source:path-in-source``), ``label`` (after the label rules), ``raw_label`` (as the source
wrote it), ``source``, ``site``, ``patient_id`` (as the source wrote it; unique only within its source), ``group`` (the dedup
group: films sharing it always land in one split), ``split`` (train/val/test), ``exclude`` (empty,
or why the row is not used), ``duplicate_of`` and ``note``. ``training.data.records.read_dataset`` reads it
(excluded rows skipped, the ``split`` column used as the split).

Grouping (a union of everything below; a group never straddles splits):
  * patient ids, per source (``nih`` 00001280 and ``ieee8023`` 00001280 are different people);
  * each source's ``near_dup_group``;
  * cross-folder copies: the ``also_in_covid19_radiography`` column (``;``-separated paths) of any
    source links a film to those files of the ``covid19-radiography`` source; ``ieee8023`` films
    from Hannover Medical School are the same films as the ``hannover`` files with the same stem.

Copies (films linked by the cross-folder links, not by patient) are kept **once**:
  * the kept copy is the one from the source closest to the film's origin, in the order
    hannover, nih, ieee8023, covid19-radiography, then other sources in ``--source`` order
    (the COVID-19 Radiography Database drew from Hannover, ieee8023 and RSNA/NIH; ieee8023 imported
    Hannover). The other copies get ``exclude = duplicate`` and ``duplicate_of``.
  * **Conflicting labels** take the label of the source with the more reliable labelling, in the
    order hannover, covid19-radiography, ieee8023, nih, then other sources:
    - 5 Hannover films are ``COVID`` in hannover-covid and ``No Finding`` in ieee8023: **COVID**,
      from Hannover's current metadata (ieee8023 derived "No Finding" from dates in an early
      Hannover release that its README's erratum says had a date error);
    - 28 NIH films are ``Pneumonia`` in nih and ``Normal`` in covid19-radiography: **Normal**, from
      the RSNA Pneumonia Detection Challenge re-read by radiologists, which beats NIH's labels
      mined from report text by NLP. The NIH copy is the one kept (site NIH), with that label.
    The row's ``note`` records every conflict.

Two single-hospital folders of issue 20 (their SOURCE.md):
  * ``shenzhen`` (``nlm-shenzhen-tb``): Normal and Tuberculosis as written, every film from Shenzhen
    No.3 People's Hospital (site); one film per case, so the patient id is the file stem when the
    manifest has none, and each film is its own group;
  * ``openist`` (``openist-normal``): Normal only, one site (the chestx-ray.com teaching collection;
    the hospital is not stated); no patient ids (each film its own group).

Label rules for the known kinds (the default four classes COVID, Normal, Viral Pneumonia,
Other pneumonia):
  * covid19-radiography: COVID, Normal, Viral Pneumonia as written;
  * hannover: COVID;
  * nih: ``No Finding`` -> Normal, ``Pneumonia`` -> Other pneumonia;
  * ieee8023: COVID, ``Other pneumonia`` (bacterial, SARS, Pneumocystis, ...) -> Other pneumonia;
    ``No Finding`` -> **dropped** (``--ieee8023-no-finding drop``, the default): those 19 films are
    mostly normal-looking films of COVID-19 patients (prior or admission films, "CXR: Normal" cases
    of COVID case series, Hannover films with the date error), not healthy controls, so as Normal
    they would be label noise and as COVID they would be guesses. ``--ieee8023-no-finding normal``
    keeps them as Normal.
  * generic sources: folder / manifest labels as written.
Then ``--relabel OLD=NEW`` (repeatable; e.g. ``Normal=non-COVID`` for a binary model) and
``--drop-label NAME`` apply to every source.

Splits: grouped, stratified by source and label (so every source has val and test films), 70/15/15
with ``--seed``. ``--pin-split NAME=split.csv`` keeps an earlier run's split for source NAME's
films (e.g. the bundled v2 model's covid19-radiography split, so its test films stay test): a
group holding a pinned film (a copy, a patient) takes that film's split (the most common one if
several), and only the other groups are dealt anew.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from training.data.kinds import (
    COLUMNS,
    KEEP_ORDER,
    KINDS,
    LABEL_NOTES,
    LABEL_TRUST,
    Row,
    SourceSpec,
    parse_source,
    read_source,
)
from training.data.records import UnionFind

log = logging.getLogger("training.data.sources")


def _rank(order: Sequence[str], extra: Sequence[str], row: Row) -> tuple[int, int]:
    if row.kind in order:
        return (0, order.index(row.kind))
    return (1, extra.index(row.source) if row.source in extra else len(extra))


def merge(specs: Sequence[SourceSpec], ieee8023_no_finding: str = "drop", relabel: Mapping[str, str] | None = None,
          drop_labels: Iterable[str] = (), seed: int = 42, fractions: Sequence[float] = (0.70, 0.15, 0.15),
          pinned: Mapping[str, Mapping[str, str]] | None = None) -> list[Row]:
    """Read, link, deduplicate, relabel and split. Returns every row (excluded ones included)."""
    from training.data.records import Record, grouped_stratified_split

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique (got {names})")
    rows: list[Row] = [r for s in specs for r in read_source(s)]
    c19 = [s.name for s in specs if s.kind == "covid19-radiography"]
    hannover = [s.name for s in specs if s.kind == "hannover"]

    # ---- film identity (copies) and dedup groups (copies + patients + near-duplicates)
    copies, groups = UnionFind(), UnionFind()
    for r in rows:
        node = f"file:{r.key}"
        copies.find(node)
        groups.find(node)
        links = [f"file:{c}:{a}" for c in c19 for a in r.also_in_c19]
        if r.kind == "ieee8023" and r.site == "Hannover Medical School":
            links += [f"file:{h}:COVID/{Path(r.relpath).stem}.png" for h in hannover]
        for ln in links:
            copies.union(node, ln)
            groups.union(node, ln)
        if r.patient_id:
            groups.union(node, f"patient:{r.source}:{r.patient_id}")
        if r.near_dup:
            groups.union(node, f"neardup:{r.source}:{r.near_dup}")

    # ---- keep one copy per film; conflicting labels by label trust
    by_copy: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_copy[copies.find(f"file:{r.key}")].append(r)
    n_dup = n_conflict = 0
    for members in by_copy.values():
        if len(members) < 2:
            continue
        keep = min(members, key=lambda r: (_rank(KEEP_ORDER, names, r), r.relpath))
        labels = {r.label for r in members}
        if len(labels) > 1:
            n_conflict += 1
            trusted = min(members, key=lambda r: (_rank(LABEL_TRUST, names, r), r.relpath))
            desc = "; ".join(
                f"{r.raw_label} in {r.source}" + (f" ({LABEL_NOTES[(r.kind, r.raw_label)]})"
                                                 if (r.kind, r.raw_label) in LABEL_NOTES else "")
                for r in sorted(members, key=lambda r: _rank(LABEL_TRUST, names, r)))
            keep.notes.append(f"label conflict: {desc}; label {trusted.label} from {trusted.source}")
            keep.label = trusted.label  # raw_label stays as the kept copy's source wrote it
        for r in members:
            if r is not keep:
                n_dup += 1
                r.exclude = "duplicate"
                r.duplicate_of = keep.key
    log.info("cross-folder copies: %d dropped (one copy kept per film), %d label conflicts resolved", n_dup,
             n_conflict)

    # ---- label rules
    relabel = dict(relabel or {})
    drop = set(drop_labels)
    for r in rows:
        if r.exclude:
            continue
        if (r.kind == "ieee8023" and r.raw_label == "No Finding" and r.label == "Normal"
                and ieee8023_no_finding == "drop"):
            r.exclude = "ieee8023 No Finding (not a healthy control: mostly COVID-19 patients' normal-looking films)"
            continue
        r.label = relabel.get(r.label, r.label)
        if r.label in drop:
            r.exclude = f"label {r.label} dropped (--drop-label)"

    # ---- groups and the split (strata: source/label), decided on kept rows
    for r in rows:
        root = groups.find(f"file:{r.key}")
        r.group = "g" + hashlib.sha1(root.encode("utf-8")).hexdigest()[:12]
    kept = [r for r in rows if not r.exclude]
    if not kept:
        raise ValueError("every film was excluded: check --drop-label / --relabel")
    pins: dict[str, Counter] = defaultdict(Counter)
    for r in rows:  # excluded copies count too: their kept copy follows the split they had
        sp = (pinned or {}).get(r.source, {}).get(r.relpath)
        if sp:
            pins[r.group][sp] += 1
    group_split = {g: c.most_common(1)[0][0] for g, c in pins.items()}
    straddled = {g: c for g, c in pins.items() if len(c) > 1}
    for r in rows:
        if r.group in straddled:
            r.notes.append("pinned split straddled this group (" + ", ".join(
                f"{n} {sp}" for sp, n in sorted(straddled[r.group].items())) + f"); took {group_split[r.group]}")
    if straddled:
        log.warning("%d dedup group(s) straddled the pinned split (copies or patients found only across "
                    "folders); each now lies in its most common split (noted in the 'note' column)", len(straddled))
    if pinned:
        missing = {n for n in pinned if n not in names}
        if missing:
            raise ValueError(f"--pin-split names unknown source(s) {', '.join(sorted(missing))}")
        log.info("pinned splits: %d groups from %s", len(group_split), ", ".join(pinned))
    free = [r for r in kept if r.group not in group_split]
    recs = [Record(r.abspath, r.label, r.group, r.key, source=r.source) for r in free]
    assign = grouped_stratified_split(recs, fractions, seed=seed, stratum=lambda x: f"{x.source}/{x.label}") \
        if recs else {}
    for r in free:
        group_split[r.group] = assign[r.key]
    for r in kept:
        r.split = group_split[r.group]
    for r in rows:
        if r.exclude:
            r.split = group_split.get(r.group, "")
    return rows


def write_manifest(rows: Sequence[Row], out: Path, relative: bool = False) -> Path:
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            path = os.path.relpath(r.abspath, out.parent) if relative else r.abspath
            w.writerow([Path(path).as_posix(), r.key, r.label, r.raw_label, r.source, r.site, r.patient_id, r.group,
                        r.split, r.exclude, r.duplicate_of, " | ".join(r.notes), r.view])
    os.replace(tmp, out)
    return out


def summary(rows: Sequence[Row]) -> dict:
    kept = [r for r in rows if not r.exclude]
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for r in kept:
        counts.setdefault(r.source, {}).setdefault(r.label, {"train": 0, "val": 0, "test": 0})[r.split] += 1
    excluded = Counter((r.source, r.exclude.split(" (")[0]) for r in rows if r.exclude)
    return {"films": len(rows), "kept": len(kept), "labels": sorted({r.label for r in kept}),
            "counts": counts, "excluded": {f"{s}: {why}": n for (s, why), n in sorted(excluded.items())},
            "groups": len({r.group for r in kept}),
            "label_conflicts": sum(1 for r in kept if any(n.startswith("label conflict") for n in r.notes))}


def check_split(rows: Sequence[Row]) -> None:
    """Raise if a dedup group has kept films in two splits (a leak; a bug in :func:`merge`)."""
    seen: dict[str, str] = {}
    for r in rows:
        if r.exclude:
            continue
        if seen.setdefault(r.group, r.split) != r.split:
            raise RuntimeError(f"group {r.group} is in splits {seen[r.group]} and {r.split}")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m training.data.sources", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="merge sources into one manifest with grouped splits",
                       description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--source", action="append", required=True, metavar="NAME=DIR",
                   help="a source folder (with or without manifest.csv) or manifest CSV; repeat for each source")
    b.add_argument("--kind", action="append", default=[], metavar="NAME=KIND",
                   help=f"the kind of source NAME ({', '.join(KINDS)}); default from the name or folder name")
    b.add_argument("--out", required=True, help="the merged manifest CSV to write (a summary JSON goes next to it)")
    b.add_argument("--relative", action="store_true", help="write paths relative to the manifest's folder")
    b.add_argument("--ieee8023-no-finding", choices=["drop", "normal"], default="drop",
                   help="ieee8023 'No Finding' films: drop (default) or keep as Normal")
    b.add_argument("--relabel", action="append", default=[], metavar="OLD=NEW",
                   help="rename a label after the source rules, e.g. Normal=non-COVID (repeatable)")
    b.add_argument("--drop-label", action="append", default=[], metavar="LABEL",
                   help="exclude films with this label (after --relabel; repeatable)")
    b.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    b.add_argument("--pin-split", action="append", default=[], metavar="NAME=SPLIT_CSV",
                   help="keep this split.csv's (path,split; paths as in source NAME) split for NAME's films")
    b.add_argument("--log-level", default="INFO")
    return p


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"{flag} {it!r}: expected A=B")
        a, b = it.split("=", 1)
        out[a.strip()] = b.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        kinds = _pairs(args.kind, "--kind")
        specs = [parse_source(s, kinds) for s in args.source]
        pinned = {}
        for name, f in _pairs(args.pin_split, "--pin-split").items():
            with open(f, newline="", encoding="utf-8") as fh:
                pinned[name] = {r["path"]: r["split"] for r in csv.DictReader(fh)}
        rows = merge(specs, args.ieee8023_no_finding, _pairs(args.relabel, "--relabel"), args.drop_label, args.seed,
                     pinned=pinned)
    except ValueError as e:
        raise SystemExit(f"training.data.sources: {e}") from None
    check_split(rows)
    out = write_manifest(rows, Path(args.out), args.relative)
    summ = summary(rows)
    summ.update({"sources": {s.name: {"path": str(s.path), "kind": s.kind} for s in specs}, "seed": args.seed,
                 "ieee8023_no_finding": args.ieee8023_no_finding, "relabel": _pairs(args.relabel, "--relabel"),
                 "drop_label": args.drop_label, "pin_split": _pairs(args.pin_split, "--pin-split")})
    out.with_suffix(".json").write_text(json.dumps(summ, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s: %d films, %d kept in %d groups, labels %s", out, summ["films"], summ["kept"],
             summ["groups"], ", ".join(summ["labels"]))
    for k, n in summ["excluded"].items():
        log.info("  excluded %s: %d", k, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
