"""What the console's pages show, read from the database (and the result files for the SR).

The worklist is one filtered, ordered, paged query over ``studies``, then one aggregate query per
kind of count over the page's studies only, so its cost hardly grows with the number of studies
(bench/web.py measures it with 10,000).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import Session

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import ImageResult, Instance, OutboxItem, Study
from cxr_node.dicom.uids import is_valid_uid
from cxr_node.outbox.files import result_path
from cxr_node.study import states as studies

PRIORITIES = ("urgent", "review", "routine")
PAGE_SIZE = 50
_PRIORITY_RANK = case({"urgent": 0, "review": 1, "routine": 2}, value=Study.priority, else_=3)


valid_uid = is_valid_uid  # nothing but a DICOM UID reaches a query or a path


class BadFilter(ValueError):
    """A worklist filter value that is not one of the allowed forms (the page says which)."""


#: The most pages a listing goes to: a page number past it is refused (an SQL OFFSET past 2**63
#: raised OverflowError, a 500).
MAX_PAGE = 100_000
#: The days a date filter may name: the next day must exist too (9999-12-31 overflowed).
MIN_DATE, MAX_DATE = dt.date(1900, 1, 1), dt.date(9999, 12, 30)


def page_number(value: str | None) -> int:
    """A ``page`` query parameter: 1 when absent; BadFilter unless a whole number 1..MAX_PAGE."""
    value = (value or "").strip()
    if not value:
        return 1
    if not value.isascii() or not value.isdigit() or len(value) > 6 or not 1 <= int(value) <= MAX_PAGE:
        raise BadFilter(f"page must be a whole number from 1 to {MAX_PAGE}")
    return int(value)


@dataclass(frozen=True)
class WorklistFilter:
    state: str | None = None
    priority: str | None = None   # urgent | review | routine | none
    station: str | None = None
    date: dt.date | None = None   # received on this UTC day
    patient_id: str | None = None
    page: int = 1

    @classmethod
    def from_query(cls, q: Any) -> "WorklistFilter":
        def get(k: str) -> str | None:
            v = (q.get(k) or "").strip()
            return v or None

        state, priority, station, day, pid = (get(k) for k in ("state", "priority", "station", "date", "patient_id"))
        if state and state not in studies.STATES:
            raise BadFilter(f"state must be one of {', '.join(studies.STATES)}")
        if priority and priority not in PRIORITIES + ("none",):
            raise BadFilter(f"priority must be one of {', '.join(PRIORITIES)}, none")
        if station and len(station) > 16:
            raise BadFilter("station: an AE title has at most 16 characters")
        if pid and len(pid) > 64:
            raise BadFilter("patient ID: at most 64 characters")
        date = None
        if day:
            try:
                date = dt.date.fromisoformat(day)
            except ValueError:
                raise BadFilter("date must be YYYY-MM-DD") from None
            if not MIN_DATE <= date <= MAX_DATE:
                raise BadFilter(f"date must be from {MIN_DATE} to {MAX_DATE}")
        return cls(state, priority, station, date, pid, page_number(get("page")))

    def params(self, **change: Any) -> dict[str, str]:
        """The filter as query parameters (for paging links and the JSON API)."""
        d = {"state": self.state, "priority": self.priority, "station": self.station,
             "date": self.date.isoformat() if self.date else None, "patient_id": self.patient_id,
             "page": str(self.page) if self.page > 1 else None}
        d.update({k: (str(v) if v is not None else None) for k, v in change.items()})
        return {k: v for k, v in d.items() if v}


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z") if t else None


def worklist(s: Session, f: WorklistFilter, page_size: int = PAGE_SIZE, settings: Settings | None = None
             ) -> dict[str, Any]:
    """One page of studies, urgent first, then the most recently received. With ``settings``, each
    study also has what a reader knows it by (patient name, accession, study date and
    description, station name: :mod:`cxr_node.web.headers`) and its top finding."""
    where = []
    if f.state:
        where.append(Study.state == f.state)
    if f.priority == "none":
        where.append(Study.priority.is_(None))
    elif f.priority:
        where.append(Study.priority == f.priority)
    if f.patient_id:
        where.append(Study.patient_id == f.patient_id)
    if f.date:
        start = dt.datetime.combine(f.date, dt.time(), tzinfo=dt.timezone.utc)
        where += [Study.first_received_at >= start, Study.first_received_at < start + dt.timedelta(days=1)]
    if f.station:
        where.append(exists().where(Instance.study_uid == Study.study_uid, Instance.calling_aet == f.station))
    total = s.scalar(select(func.count()).select_from(Study).where(*where))
    rows = s.scalars(select(Study).where(*where).order_by(_PRIORITY_RANK, Study.last_received_at.desc(),
                                                          Study.study_uid)
                     .limit(page_size).offset((f.page - 1) * page_size)).all()
    uids = [r.study_uid for r in rows]
    stations: dict[str, set[str]] = {}
    counts: dict[tuple[str, int], dict[bool, int]] = {}
    delivery: dict[str, dict[str, int]] = {}
    if uids:
        for uid, aet in s.execute(select(Instance.study_uid, Instance.calling_aet).where(
                Instance.study_uid.in_(uids)).distinct()):
            if aet:
                stations.setdefault(uid, set()).add(aet)
        for uid, version, analysed, n in s.execute(
                select(ImageResult.study_uid, ImageResult.study_version, ImageResult.analysed, func.count())
                .where(ImageResult.study_uid.in_(uids))
                .group_by(ImageResult.study_uid, ImageResult.study_version, ImageResult.analysed)):
            counts.setdefault((uid, version), {})[bool(analysed)] = n
        for uid, state, n in s.execute(select(OutboxItem.study_uid, OutboxItem.state, func.count())
                                       .where(OutboxItem.study_uid.in_(uids))
                                       .group_by(OutboxItem.study_uid, OutboxItem.state)):
            delivery.setdefault(uid, {})[state] = n
    items = []
    for r in rows:
        c = counts.get((r.study_uid, r.processed_version), {}) if r.processed_version else {}
        d = delivery.get(r.study_uid, {})
        items.append({
            "study_uid": r.study_uid, "patient_id": r.patient_id, "state": r.state, "priority": r.priority,
            "version": r.version, "stations": sorted(stations.get(r.study_uid, ())),
            "films": r.instance_count, "analysed": c.get(True, 0), "refused": c.get(False, 0),
            "received_at": _iso(r.first_received_at), "last_received_at": _iso(r.last_received_at),
            "processed_at": _iso(r.state_changed_at) if r.state in studies.FINISHED else None,
            "delivery": delivery_state(d), "outbox": d,
        })
    if settings is not None and items:
        _reader_facts(s, settings, items, {r.study_uid: r for r in rows})
    pages = max(1, -(-total // page_size))
    return {"total": total, "page": f.page, "pages": pages, "page_size": page_size, "studies": items}


def films_in_words(films: int, analysed: int, refused: int) -> str:
    """'2 films: 1 analysed, 1 not analysed', '1 film, analysed', '1 film, not analysed yet'."""
    noun = "film" if films == 1 else "films"
    if analysed + refused == 0:
        return f"{films} {noun}, not analysed yet"
    if films == 1:
        return f"1 film, {'analysed' if analysed else 'not analysed'}"
    parts = [f"{analysed} analysed"] if analysed else []
    parts += [f"{refused} not analysed"] if refused else []
    rest = films - analysed - refused
    parts += [f"{rest} not for triage"] if rest > 0 else []
    return f"{films} {noun}: " + ", ".join(parts)


def top_finding(results: list[Any]) -> tuple[str | None, float | None]:
    """The finding a worklist row names for a study's analysed films (ImageResult rows): each film's
    own, stored at triage time (image_results.finding, migration 0016: "abnormal" with p(abnormal) for
    a model with that output, else the class that raised the flag); the most urgent film speaks."""
    analysed = [r for r in results if r.analysed and r.finding]
    if not analysed:
        return None, None
    r = min(analysed, key=lambda x: (PRIORITIES.index(x.priority) if x.priority in PRIORITIES else 3,
                                     -(x.finding_probability or 0.0)))
    return r.finding, r.finding_probability


def _reader_facts(s: Session, settings: Settings, items: list[dict[str, Any]], rows: dict[str, Study]) -> None:
    from cxr_node.web import headers, images

    uids = [i["study_uid"] for i in items]
    first: dict[str, str] = {}
    for uid, path in s.execute(select(Instance.study_uid, Instance.path)
                               .where(Instance.study_uid.in_(uids), Instance.removed_at.is_(None))
                               .order_by(Instance.received_at)):
        first.setdefault(uid, path)
    results: dict[str, list[ImageResult]] = {}
    versions = {uid: r.processed_version for uid, r in rows.items() if r.processed_version}
    if versions:
        for r in s.scalars(select(ImageResult).where(ImageResult.study_uid.in_(list(versions)))):
            if versions.get(r.study_uid) == r.study_version:
                results.setdefault(r.study_uid, []).append(r)
    for item in items:
        uid = item["study_uid"]
        path = images.inside(settings.storage.spool_dir, first[uid]) if uid in first else None
        h = headers.read(path)
        label, p = top_finding(results.get(uid, []))
        item.update({
            "patient_name": h.get("patient_name") or "", "accession": rows[uid].accession_number or h.get("accession") or "",
            "study_date": h.get("study_date") or "", "study_description": h.get("study_description") or "",
            "station_name": h.get("station_name") or "", "finding": label, "finding_probability": p,
            "films_text": films_in_words(item["films"], item["analysed"], item["refused"]),
        })


def delivery_state(counts: dict[str, int]) -> str:
    """One word for a study's results: none queued, pending, sent, or dead (some gave up)."""
    if not counts:
        return "none"
    if counts.get("dead"):
        return "dead"
    if counts.get("pending"):
        return "pending"
    return "sent"


def stations(s: Session) -> list[str]:
    return [a for a in s.scalars(select(Instance.calling_aet).where(Instance.calling_aet.is_not(None))
                                 .distinct().order_by(Instance.calling_aet).limit(500))]


@dataclass
class FilmView:
    sop_instance_uid: str
    calling_aet: str | None
    received_at: str | None
    on_disk: bool
    analysed: bool | None = None          # None: no result for the current version yet
    reason: str | None = None             # why not analysed
    top_label: str | None = None
    urgent: bool | None = None
    priority: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    flag_reasons: str | None = None       # why the policy flagged it (from image.triaged)
    overlay_uid: str | None = None        # the Secondary Capture, when its file is still there
    model_version: str | None = None
    calibration: str | None = None        # "model", or the site calibration whose operating points applied
    abnormal: float | None = None         # p(abnormal), models with an abnormality output (v5)
    why: list[str] = field(default_factory=list)  # the flag in words, from the SR's operating points


def study(s: Session, settings: Settings, study_uid: str) -> dict[str, Any] | None:
    """Everything the study page shows; None for an unknown study."""
    st = s.get(Study, study_uid)
    if st is None:
        return None
    instances = s.scalars(select(Instance).where(Instance.study_uid == study_uid)
                          .order_by(Instance.received_at, Instance.sop_instance_uid)).all()
    results = {r.sop_instance_uid: r for r in s.scalars(select(ImageResult).where(
        ImageResult.study_uid == study_uid, ImageResult.study_version == st.processed_version))} \
        if st.processed_version else {}
    story = audit.study_story(s, study_uid)
    flag_reasons = {r["sop_instance_uid"]: r["reason"] for r in story
                    if r["event"] == "image.triaged" and (r["detail"] or {}).get("version") == st.processed_version}
    films = []
    for inst in instances:
        f = FilmView(inst.sop_instance_uid, inst.calling_aet, _iso(inst.received_at), inst.removed_at is None)
        r = results.get(inst.sop_instance_uid)
        if r is not None:
            f.analysed, f.reason, f.top_label, f.urgent = r.analysed, r.reason, r.top_label, r.urgent
            f.priority, f.probabilities, f.model_version = r.priority, dict(r.probabilities or {}), r.model_version
            f.calibration, f.abnormal = r.calibration, r.abnormal
            f.flag_reasons = flag_reasons.get(inst.sop_instance_uid)
            if r.sc_sop_instance_uid and result_file(settings, study_uid, r.sc_sop_instance_uid) is not None:
                f.overlay_uid = r.sc_sop_instance_uid
        elif not inst.triage_eligible:
            f.analysed, f.reason = False, inst.not_for_triage_reason
        films.append(f)
    outbox = s.scalars(select(OutboxItem).where(OutboxItem.study_uid == study_uid).order_by(OutboxItem.id)).all()
    sr = sr_content(settings, study_uid, st.last_sr_uid)
    groups = {g["source_sop_uids"][0]: g for g in (sr or {}).get("findings", []) if g.get("source_sop_uids")}
    for f in films:
        if f.analysed:
            f.why = flag_in_words(groups.get(f.sop_instance_uid), f.priority, f.calibration)
    from cxr_node.audit.story import sentence
    from cxr_node.web import headers, images

    first = next((i for i in instances if i.removed_at is None), None)
    reader = headers.read(images.inside(settings.storage.spool_dir, first.path) if first else None)
    shadow = any(r["event"] == "study.shadow" and (r["detail"] or {}).get("version") == st.processed_version
                 for r in story)
    return {
        "study": {"study_uid": st.study_uid, "patient_id": st.patient_id, "state": st.state, "priority": st.priority,
                  "version": st.version, "processed_version": st.processed_version, "films": st.instance_count,
                  "received_at": _iso(st.first_received_at), "last_received_at": _iso(st.last_received_at),
                  "state_changed_at": _iso(st.state_changed_at), "last_error": st.last_error,
                  "last_sr_uid": st.last_sr_uid, "accession": st.accession_number or reader.get("accession"),
                  "shadow": shadow, **{k: reader.get(k) for k in ("patient_name", "study_date", "study_description",
                                                                  "station_name", "institution")}},
        "films": films,
        "sr": sr,
        "outbox": [outbox_row(o) for o in outbox],
        "story": [{**r, "text": audit.describe(r), "sentence": sentence(r, short=True)} for r in story],
    }


def flag_in_words(group: dict[str, Any] | None, priority: str | None, calibration: str | None) -> list[str]:
    """Why a film got its priority, from its SR group: the abnormality estimate against its operating
    point ('abnormal 87%, above the model's operating point of 40% (not yet calibrated at this site)'),
    or each non-normal class above its operating point, or why nothing was flagged."""
    from cxr_node.encode.wording import is_normal, percent

    if not group or not (group.get("thresholds") or group.get("abnormal_threshold") is not None):
        return []
    site = bool(calibration and calibration != "model")
    whose, note = ("this site's", "") if site else ("the model's", " (not yet calibrated at this site)")
    probs, ops, above = group["probabilities"], group["thresholds"], group.get("above", {})
    out = [f"{label} pattern {percent(probs[label], 2)}, above {whose} operating point of {percent(ops[label], 2)}"
           for label in sorted(probs, key=probs.get, reverse=True)
           if above.get(label) and not is_normal(label) and label in ops]
    a, t = group.get("abnormal"), group.get("abnormal_threshold")
    if a is not None and t is not None:
        side = "above" if a >= t else "below"
        return [f"abnormal {percent(a, 2)}, {side} {whose} operating point of {percent(t, 2)}{note}"] + out
    if out:
        return [o + note for o in out]
    top = max(probs, key=probs.get)
    if priority == "review":
        return [f"top class {top} {percent(probs[top], 2)} is not normal; no class is above its operating point"]
    note = "" if site else "not yet calibrated at this site; "
    return [f"no finding above {whose} operating point ({note}top class {top} {percent(probs[top], 2)})"]


def result_file(settings: Settings, study_uid: str, sop_uid: str) -> Path | None:
    """The result file of ``sop_uid`` (both validated UIDs) under data_dir/outbox, if it is there."""
    if not (valid_uid(study_uid) and valid_uid(sop_uid)):
        return None
    base = settings.storage.outbox_dir.resolve()
    p = (base / result_path(study_uid, sop_uid)).resolve()
    if not p.is_relative_to(base) or not p.is_file():
        return None
    return p


def sr_content(settings: Settings, study_uid: str, sr_uid: str | None) -> dict[str, Any] | None:
    """The study's last SR as plain findings, or why it cannot be shown."""
    if not sr_uid:
        return None
    p = result_file(settings, study_uid, sr_uid)
    if p is None:
        return {"sr_uid": sr_uid, "findings": [], "note": "the SR file is no longer kept (retention removes sent results)"}
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from cxr_node.encode.sr import read_findings

    try:
        findings = read_findings(dcmread(p))
    except (InvalidDicomError, OSError, ValueError, AttributeError, IndexError) as e:
        return {"sr_uid": sr_uid, "findings": [], "note": f"the SR cannot be read: {type(e).__name__}"}
    return {"sr_uid": sr_uid, "findings": findings, "note": None}


def outbox_row(o: OutboxItem) -> dict[str, Any]:
    return {"id": o.id, "state": o.state, "destination": o.destination, "kind": o.kind, "study_uid": o.study_uid,
            "study_version": o.study_version, "sop_instance_uid": o.sop_instance_uid, "attempts": o.attempts,
            "next_attempt_at": _iso(o.next_attempt_at), "last_status": o.last_status, "last_error": o.last_error,
            "created_at": _iso(o.created_at), "sent_at": _iso(o.sent_at)}


def outbox(s: Session, state: str | None, page: int, page_size: int = 100) -> dict[str, Any]:
    q = select(OutboxItem)
    c = select(func.count()).select_from(OutboxItem)
    if state:
        q, c = q.where(OutboxItem.state == state), c.where(OutboxItem.state == state)
    total = s.scalar(c)
    rows = s.scalars(q.order_by(OutboxItem.id.desc()).limit(page_size).offset((page - 1) * page_size)).all()
    counts = dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
    return {"items": [outbox_row(o) for o in rows], "total": total, "page": page,
            "pages": max(1, -(-total // page_size)), "counts": counts}


# ---------------------------------------------------------------------------------- onboarding


def study_feedback(s: Session, study_uid: str) -> dict[str, Any]:
    """The readers' labels of a study: those in force (study and films), the history, and the
    labels a reader may choose (the model's, plus Normal, Abnormal and Other)."""
    from cxr_node.db.models import Feedback
    from cxr_node.onboarding import feedback

    rows = feedback.history(s, study_uid)
    choices = feedback.choices(feedback.model_labels(s, study_uid))

    def view(r: Feedback) -> dict[str, Any]:
        return {"label": r.label, "reader": r.reader, "film": r.sop_instance_uid, "source": r.source,
                "labelled_at": r.labelled_at, "superseded": r.superseded_at is not None}

    return {"in_force": [view(r) for r in rows if r.superseded_at is None], "history": [view(r) for r in rows],
            "choices": choices}


def station_names(s: Session) -> set[str]:
    from cxr_node.db.models import StationRow

    return set(s.scalars(select(StationRow.name)))


def stations_overview(s: Session, critical: list[str], n_boot: int = 200) -> list[dict[str, Any]]:
    """Every station this node has seen: mode, drift, site calibrations, and local performance."""
    from cxr_node.db.models import SiteCalibration, StationRow
    from cxr_node.onboarding import performance

    out = []
    for row in s.scalars(select(StationRow).order_by(StationRow.name)):
        cals = s.scalars(select(SiteCalibration).where(SiteCalibration.station == row.name)
                         .order_by(SiteCalibration.version.desc())).all()
        films = performance.labelled_films(s, station=row.name)
        perf = performance.compute(films, list(films[0].probabilities), critical, n_boot=n_boot) if films else None
        moved = (row.drift_detail or {}).get("moved") if isinstance(row.drift_detail, dict) else None
        out.append({
            "name": row.name, "ae_title": row.ae_title, "mode": row.mode, "configured": row.configured,
            "mode_since": row.mode_since, "drift_state": row.drift_state or "too few films",
            "drift_checked_at": row.drift_checked_at, "moved": moved or [],
            "calibrations": [{"version": c.version, "active": c.active, "model_version": c.model_version,
                              "temperature": c.temperature, "thresholds": c.thresholds, "created_at": c.created_at,
                              "retired_at": c.retired_at} for c in cals],
            "films": len(films), "perf": perf,
            "critical": [(c, perf["per_class"][c]) for c in critical if perf and c in perf.get("per_class", {})],
        })
    return out
