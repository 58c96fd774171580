"""What the radiologist said: labels for studies (or single films), kept with who and when.

Every label is a row of its own and audited (``feedback.added``). A later label for the same study
(and film) supersedes the earlier one, which is kept with ``superseded_at`` / ``superseded_by``:
the history stays. A label is one of the model's labels, ``Normal``, ``Abnormal`` (something is
wrong on the film, no class named: the v5 abnormality axis), or ``Other`` (none of the model's
classes), matched without regard to case. On the abnormal axis (:func:`is_abnormal`) every label
but Normal counts as abnormal: a class label, Other, and Abnormal itself.

Python API (the CLI and the web console call these):

* :func:`add_label` stores one label in the caller's session (the caller commits), or in its own
  transaction when given a :class:`~cxr_node.db.session.Database`;
* :func:`import_csv` checks every row of a CSV file first and stores all of them in one
  transaction, or none when any row is wrong (each problem is reported with its line).
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import select

from cxr_node.audit import trail as audit
from cxr_node.db.models import Feedback, ImageResult, Instance, Study, utcnow
from cxr_node.errors import CxrNodeError

OTHER = "Other"
NORMAL = "Normal"
ABNORMAL = "Abnormal"
NORMAL_NAMES = ("normal", "no finding", "no_finding")


def is_abnormal(label: str | None) -> bool | None:
    """A reader's label on the abnormal axis: False for Normal (or the model's own normal class,
    e.g. No Finding), True for any other label (Abnormal, Other, a finding class), None without one."""
    text = (label or "").strip().lower()
    if not text:
        return None
    return text not in NORMAL_NAMES


def choices(labels: Sequence[str]) -> list[str]:
    """The labels a reader may give: the model's, then Normal, Abnormal and Other."""
    return list(dict.fromkeys(list(labels) + [NORMAL, ABNORMAL, OTHER]))


class FeedbackError(CxrNodeError):
    """A label that cannot be stored (unknown study or label, bad time); the message says which."""


def model_labels(session, study_uid: str | None = None) -> list[str]:
    """The labels the model gave probabilities for: from this study's results when it has some,
    else from the newest result of any study (empty when nothing was analysed yet)."""
    q = select(ImageResult.probabilities).where(ImageResult.analysed.is_(True))
    if study_uid is not None:
        row = session.scalar(q.where(ImageResult.study_uid == study_uid).order_by(ImageResult.id.desc()).limit(1))
        if row:
            return list(row)
    row = session.scalar(q.order_by(ImageResult.id.desc()).limit(1))
    return list(row) if row else []


def canonical_label(label: str, labels: Sequence[str]) -> str:
    """``label`` spelled as the model spells it (or ``Normal`` / ``Abnormal`` / ``Other``); FeedbackError if unknown."""
    text = (label or "").strip()
    for name in choices(labels):
        if text.lower() == name.lower():
            if name == NORMAL:  # the model's own normal class, whatever its spelling
                return next((x for x in labels if x.lower() in NORMAL_NAMES), NORMAL)
            return name
    known = ", ".join(choices(labels))
    raise FeedbackError(f"unknown label {label!r} (known: {known})")


def parse_time(value: str | None) -> dt.datetime:
    """ISO 8601 (date or date and time; no zone means UTC); now when empty."""
    if not value or not value.strip():
        return utcnow()
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FeedbackError(f"time {value!r} is not ISO 8601 (e.g. 2026-11-23T14:05:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def find_study(session, study_uid: str | None = None, accession_number: str | None = None) -> Study:
    if study_uid:
        st = session.get(Study, study_uid.strip())
        if st is None:
            raise FeedbackError(f"study {study_uid.strip()}: not known to this node (check the UID, and --config)")
        return st
    if accession_number:
        found = list(session.scalars(select(Study).where(Study.accession_number == accession_number.strip())))
        if not found:
            raise FeedbackError(f"accession number {accession_number.strip()}: no analysed study has it")
        if len(found) > 1:
            raise FeedbackError(f"accession number {accession_number.strip()}: {len(found)} studies have it "
                                f"({', '.join(s.study_uid for s in found)}); give study_uid instead")
        return found[0]
    raise FeedbackError("no study_uid or accession_number")


def current(session, study_uid: str, sop_instance_uid: str | None = None) -> Feedback | None:
    """The label in force for a study (``sop_instance_uid`` None) or for one of its films."""
    q = select(Feedback).where(Feedback.study_uid == study_uid, Feedback.superseded_at.is_(None))
    q = q.where(Feedback.sop_instance_uid.is_(None) if sop_instance_uid is None
                else Feedback.sop_instance_uid == sop_instance_uid)
    return session.scalars(q.order_by(Feedback.id.desc())).first()


def history(session, study_uid: str) -> list[Feedback]:
    return list(session.scalars(select(Feedback).where(Feedback.study_uid == study_uid).order_by(Feedback.id)))


@dataclass
class Outcome:
    feedback: Feedback | None  # None: a duplicate, nothing stored
    duplicate_of: Feedback | None = None
    superseded: Feedback | None = None


def add_label(target, study_uid: str | None, label: str, reader: str | None = None,
              sop_instance_uid: str | None = None, *, accession_number: str | None = None,
              labelled_at: dt.datetime | str | None = None, source: str = "api",
              labels: Sequence[str] | None = None) -> Outcome:
    """Store one label. ``target`` is a SQLAlchemy session (the caller commits; nothing is stored if
    it rolls back), or a :class:`cxr_node.db.session.Database` or SQLAlchemy Engine (its own transaction).

    The study is named by ``study_uid`` or ``accession_number``; ``sop_instance_uid`` (optional)
    must be one of its films. ``label`` is checked against ``labels`` (default: the labels the
    model gave for this study) plus Normal, Abnormal and Other. The same label already in force is a
    duplicate: nothing is stored and ``Outcome.feedback`` is None. Raises FeedbackError."""
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from cxr_node.db.session import Database

    kw = dict(accession_number=accession_number, labelled_at=labelled_at, source=source, labels=labels)
    if isinstance(target, Database):
        with target.transaction() as s:
            return add_label(s, study_uid, label, reader, sop_instance_uid, **kw)
    if isinstance(target, Engine):
        with Session(target, expire_on_commit=False) as s, s.begin():
            return add_label(s, study_uid, label, reader, sop_instance_uid, **kw)
    s = target
    st = find_study(s, study_uid, accession_number)
    sop = (sop_instance_uid or "").strip() or None
    if sop is not None:
        inst = s.get(Instance, sop)
        if inst is None or inst.study_uid != st.study_uid:
            raise FeedbackError(f"film {sop}: not a film of study {st.study_uid}")
    names = list(labels) if labels is not None else model_labels(s, st.study_uid)
    name = canonical_label(label, names)
    when = labelled_at if isinstance(labelled_at, dt.datetime) else parse_time(labelled_at)
    if when.tzinfo is None:
        raise FeedbackError("labelled_at must be timezone-aware (UTC)")
    who = (reader or "").strip()[:64] or None
    before = current(s, st.study_uid, sop)
    if before is not None and before.label == name:
        return Outcome(None, duplicate_of=before)
    now = utcnow()
    row = Feedback(study_uid=st.study_uid, sop_instance_uid=sop, label=name, reader=who, labelled_at=when,
                   recorded_at=now, source=source[:255])
    s.add(row)
    s.flush()
    if before is not None:
        before.superseded_at, before.superseded_by = now, row.id
    audit.record(s, "feedback.added", study_uid=st.study_uid, sop_instance_uid=sop, patient_id=st.patient_id,
                 reason=(f"supersedes {before.label!r}" if before is not None else None),
                 detail={"id": row.id, "label": name, "reader": who, "source": row.source,
                         "labelled_at": when.isoformat(timespec="seconds"),
                         "supersedes": before.id if before is not None else None,
                         "previous_label": before.label if before is not None else None})
    return Outcome(row, superseded=before)


@dataclass
class ImportReport:
    path: str
    rows: int = 0
    stored: int = 0
    superseded: int = 0
    duplicates: list[str] = field(default_factory=list)  # one line each
    problems: list[str] = field(default_factory=list)    # one line each; any -> nothing stored

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path, "rows": self.rows, "stored": self.stored if self.ok else 0,
                "superseded": self.superseded if self.ok else 0, "duplicates": self.duplicates,
                "problems": self.problems}


REQUIRED_ONE_OF = ("study_uid", "accession_number")
COLUMNS = ("study_uid", "accession_number", "sop_instance_uid", "label", "reader", "time")


def import_csv(db, path: str | Path, labels: Sequence[str] | None = None, dry_run: bool = False) -> ImportReport:
    """Check and store every row of a feedback CSV in one transaction; nothing is stored when any row
    is wrong. A row repeating the label already in force (or an earlier row of the file) is reported
    as a duplicate and skipped; two different labels for the same study in one file are a problem."""
    p = Path(path)
    report = ImportReport(str(p))
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else v
                     for k, v in r.items()} for r in reader]
    except FileNotFoundError:
        raise FeedbackError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FeedbackError(f"{p}: cannot read it as a UTF-8 CSV file: {e}") from None
    if len(header) == 1 and ";" in header[0]:
        raise FeedbackError(f"{p}: the columns are separated by semicolons ({header[0]}): use commas "
                            "(in a spreadsheet, save as \"CSV (comma delimited)\"); columns: "
                            f"{', '.join(COLUMNS)}")
    if "label" not in header or not any(c in header for c in REQUIRED_ONE_OF):
        raise FeedbackError(f"{p}: the header must name a label column and study_uid or accession_number "
                            f"(columns: {', '.join(COLUMNS)}; got: {', '.join(header) or 'none'})")
    unknown_cols = [h for h in header if h not in COLUMNS]
    if unknown_cols:
        raise FeedbackError(f"{p}: unknown column(s) {', '.join(unknown_cols)} (known: {', '.join(COLUMNS)})")
    report.rows = len(rows)
    seen: dict[tuple[str, str | None], tuple[int, str]] = {}
    try:
        _import_rows(db, p, rows, labels, dry_run, report, seen)
    except _RollBack:
        pass  # nothing stored: report.problems says why (or it was a dry run)
    return report


class _RollBack(Exception):
    """Leaves the import's transaction so that nothing is stored."""


def _import_rows(db, p: Path, rows: list[dict], labels, dry_run: bool, report: ImportReport,
                 seen: dict) -> None:
    with db.transaction() as s:
        for line, r in enumerate(rows, start=2):
            where = f"line {line}"
            try:
                st = find_study(s, r.get("study_uid"), r.get("accession_number"))
                sop = r.get("sop_instance_uid") or None
                names = list(labels) if labels is not None else model_labels(s, st.study_uid)
                name = canonical_label(r.get("label", ""), names)
                parse_time(r.get("time"))
            except FeedbackError as e:
                report.problems.append(f"{where}: {e}")
                continue
            key = (st.study_uid, sop)
            if key in seen:
                first_line, first_label = seen[key]
                if first_label == name:
                    report.duplicates.append(f"{where}: duplicate of line {first_line} (study {st.study_uid}"
                                             f"{', film ' + sop if sop else ''}: {name}); skipped")
                else:
                    report.problems.append(f"{where}: study {st.study_uid}{', film ' + sop if sop else ''} is "
                                           f"labelled {first_label!r} on line {first_line} and {name!r} here")
                continue
            seen[key] = (line, name)
            try:
                out = add_label(s, st.study_uid, name, r.get("reader"), sop, labelled_at=r.get("time") or None,
                                source=f"csv {p.name} line {line}", labels=names)
            except FeedbackError as e:
                report.problems.append(f"{where}: {e}")
                continue
            if out.feedback is None:
                report.duplicates.append(f"{where}: study {st.study_uid}{', film ' + sop if sop else ''} is "
                                         f"already labelled {name!r} (feedback #{out.duplicate_of.id}); skipped")
            else:
                report.stored += 1
                report.superseded += out.superseded is not None
        if report.problems or dry_run:
            raise _RollBack()
        audit.record(s, "feedback.import", reason=f"{report.stored} label(s) from {p.name}",
                     detail={k: v for k, v in report.as_dict().items() if k != "problems"})
