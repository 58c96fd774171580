"""The sources a manifest is built from: the known kinds (how each names its labels, sites and patients),
the manifest's columns, and one source read into :class:`Row` s."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

log = logging.getLogger("training.data.sources")

KINDS = ("covid19-radiography", "hannover", "nih", "ieee8023", "shenzhen", "openist", "generic")
#: source names (and folder names) recognised as a known kind
KIND_ALIASES = {
    "covid19-radiography": "covid19-radiography", "covid19_radiography": "covid19-radiography",
    "hannover": "hannover", "hannover-covid": "hannover",
    "nih": "nih", "nih-chestxray8-subset": "nih", "nih-chestxray8": "nih",
    "ieee8023": "ieee8023", "ieee8023-covid-chestxray": "ieee8023",
    "shenzhen": "shenzhen", "nlm-shenzhen-tb": "shenzhen",
    "openist": "openist", "openist-normal": "openist",
}
#: the site of every film of a single-site kind
SINGLE_SITE = {"hannover": "Hannover Medical School", "nih": "NIH Clinical Center",
               "shenzhen": "Shenzhen No.3 People's Hospital",
               "openist": "OpenIST / chestx-ray.com teaching collection (hospital not stated)"}
#: which copy of a film is kept: the source closest to the film's origin first
KEEP_ORDER = ("hannover", "nih", "ieee8023", "covid19-radiography")
#: whose label wins a conflict: the more reliable labelling first
LABEL_TRUST = ("hannover", "covid19-radiography", "ieee8023", "nih")
LABEL_MAPS: dict[str, dict[str, str]] = {
    "covid19-radiography": {},
    "hannover": {},
    "nih": {"No Finding": "Normal", "Pneumonia": "Other pneumonia"},
    "ieee8023": {"No Finding": "Normal"},
    "shenzhen": {},
    "openist": {},
    "generic": {},
}
LABEL_NOTES = {
    ("nih", "Pneumonia"): "NIH label mined from report text (NLP)",
    ("covid19-radiography", "Normal"): "RSNA Pneumonia Detection Challenge, re-read by radiologists",
    ("ieee8023", "No Finding"): "ieee8023 'No Finding' from admission dates of an early Hannover release "
                                "(date error per the Hannover README)",
    ("hannover", "COVID"): "Hannover Medical School current metadata (all patients COVID-19)",
}
COLUMNS = ["path", "id", "label", "raw_label", "source", "site", "patient_id", "group", "split", "exclude",
           "duplicate_of", "note", "view"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


@dataclass
class Row:
    source: str
    kind: str
    relpath: str  # relative to the source folder (or absolute as the manifest wrote it)
    abspath: str
    raw_label: str
    label: str
    site: str
    patient_id: str = ""
    near_dup: str = ""
    also_in_c19: list[str] = field(default_factory=list)
    view: str = ""
    exclude: str = ""
    duplicate_of: str = ""
    notes: list[str] = field(default_factory=list)
    group: str = ""
    split: str = ""

    @property
    def key(self) -> str:
        return f"{self.source}:{self.relpath}"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: Path
    kind: str


def parse_source(spec: str, kinds: Mapping[str, str] | None = None) -> SourceSpec:
    """``NAME=DIR`` (or ``NAME=manifest.csv``) -> SourceSpec; the kind from ``kinds`` or the aliases."""
    if "=" not in spec:
        raise ValueError(f"--source {spec!r}: expected NAME=DIR (e.g. nih=/data/nih-chestxray8-subset)")
    name, path = spec.split("=", 1)
    name = name.strip()
    if not name or any(c in name for c in ":;,/ "):
        raise ValueError(f"--source {spec!r}: the name must be non-empty without ':;,/' or spaces")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ValueError(f"--source {spec!r}: {p} does not exist")
    kind = (kinds or {}).get(name) or KIND_ALIASES.get(name) or KIND_ALIASES.get(
        (p if p.is_dir() else p.parent).name) or "generic"
    if kind not in KINDS:
        raise ValueError(f"--kind {name}={kind}: unknown kind (one of {', '.join(KINDS)})")
    return SourceSpec(name, p, kind)


def _site(kind: str, source: str, raw_label: str, r: Mapping[str, str]) -> str:
    if kind in SINGLE_SITE:
        return SINGLE_SITE[kind]
    if kind == "ieee8023":
        site = (r.get("site") or "").strip()
        if "hannover" in site.lower():
            return "Hannover Medical School"
        return f"ieee8023/{(r.get('country') or '').strip() or 'unknown'}"
    if kind == "covid19-radiography":
        return {"COVID": "covid19-radiography/COVID (BIMCV, Hannover, SIRM, COVID-CXNet)",
                "Normal": "covid19-radiography/Normal (RSNA-NIH, Kermany paediatric)",
                "Viral Pneumonia": "Kermany paediatric (Guangzhou)"}.get(raw_label, source)
    return (r.get("site") or "").strip() or source


def read_source(spec: SourceSpec) -> list[Row]:
    """Rows of one source: its manifest (``DIR/manifest.csv`` or a CSV) or a folder-per-class tree."""
    p = spec.path
    manifest = p / "manifest.csv" if p.is_dir() else p
    rows: list[Row] = []
    lmap = LABEL_MAPS[spec.kind]
    if manifest.is_file():
        root = manifest.parent
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{manifest}: a source manifest needs columns path,label (has {reader.fieldnames})")
            for i, r in enumerate(reader):
                rel = (r["path"] or "").strip()
                raw = (r["label"] or "").strip()
                if not rel or not raw:
                    raise ValueError(f"{manifest}: row {i + 2} has an empty path or label")
                ap = Path(rel) if Path(rel).is_absolute() else root / rel
                if spec.kind == "shenzhen" and not (r.get("patient_id") or "").strip():
                    r["patient_id"] = Path(rel).stem  # NLM: one film per case
                also = [a.strip() for a in (r.get("also_in_covid19_radiography") or "").split(";") if a.strip()]
                rows.append(Row(spec.name, spec.kind, rel, str(ap), raw, lmap.get(raw, raw),
                                _site(spec.kind, spec.name, raw, r), (r.get("patient_id") or "").strip(),
                                (r.get("near_dup_group") or "").strip(), also, (r.get("view") or "").strip()))
    elif p.is_dir():
        for cls in sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for f in sorted(cls.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    rel = f.relative_to(p).as_posix()
                    rows.append(Row(spec.name, spec.kind, rel, str(f), cls.name, lmap.get(cls.name, cls.name),
                                    _site(spec.kind, spec.name, cls.name, {})))
    else:
        raise ValueError(f"{p}: neither a folder (with or without manifest.csv) nor a manifest CSV")
    if not rows:
        raise ValueError(f"source {spec.name} ({p}): no films (class folders with .png/.jpg/.dcm, or manifest rows)")
    return rows
