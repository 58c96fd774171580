"""Sending stations: which station a film came from, its mode (shadow or active), its site
calibration, and whether what it sends has drifted.

* A station is the calling AE title, refined by StationName / InstitutionName when ``[[stations]]``
  gives them. A film from a station not listed is put in a station named by its AE title, in the
  mode ``[onboarding] new_stations`` says.
* **shadow**: films are received, analysed, audited and their results kept under data_dir/outbox,
  but nothing is queued for any destination (``cxr-node resend`` can deliver them later);
  **active**: results go to every destination.
* The config is authoritative for the mode; the ``stations`` table remembers the mode last seen so
  a change (e.g. shadow -> active) is audited as ``station.mode`` when ``serve`` starts.
* A site calibration (``cxr-node calibrate-site``) is used for a station's films only while the
  model's weights are the ones it was fitted for.

Drift: see :func:`check_drift`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import select

from cxr_node.audit import trail as audit
from cxr_node.config import Settings, Station
from cxr_node.db.models import ImageResult, SiteCalibration, StationRow, utcnow
from cxr_node.db.session import Database
from cxr_node.onboarding.drift import (  # the statistics; this module records the verdicts
    compare, describe, reference_from)

log = logging.getLogger(__name__)

ACTIVE, SHADOW = "active", "shadow"
NO_AET = "-"  # films that came without a calling AE title (e.g. imported from a folder)


@dataclass(frozen=True)
class StationRef:
    name: str
    ae_title: str | None
    mode: str
    configured: bool


def _norm(v: Any) -> str:
    return str(v or "").strip().upper()


def resolve(settings: Settings, calling_aet: str | None, station_name: Any = None,
            institution_name: Any = None) -> StationRef:
    """The station of a film: the most specific ``[[stations]]`` entry matching its calling AE title
    (and StationName / InstitutionName where the entry gives them), else a new station named by
    the AE title, in ``[onboarding] new_stations`` mode."""
    aet = (calling_aet or "").strip()
    best, score = None, -1
    for st in settings.stations:
        if st.ae_title != aet:
            continue
        if st.station_name and _norm(st.station_name) != _norm(station_name):
            continue
        if st.institution_name and _norm(st.institution_name) != _norm(institution_name):
            continue
        s = bool(st.station_name) + bool(st.institution_name)
        if s > score:
            best, score = st, s
    if best is not None:
        return StationRef(best.name, best.ae_title, best.mode, True)
    onboarding = settings.onboarding
    mode = onboarding.new_stations if onboarding else ACTIVE
    return StationRef(aet or NO_AET, aet or None, mode, False)


def configured(settings: Settings, name: str) -> Station | None:
    return next((s for s in settings.stations if s.name == name), None)


def mode_of(settings: Settings, name: str) -> str:
    st = configured(settings, name)
    if st is not None:
        return st.mode
    return settings.onboarding.new_stations if settings.onboarding else ACTIVE


def note(session, ref: StationRef) -> StationRow:  # noqa: ANN001
    """The station's row, made (and audited as ``station.added``) the first time a film comes from it;
    a mode change since the row was written is audited as ``station.mode``."""
    row = session.get(StationRow, ref.name, with_for_update=True)
    now = utcnow()
    if row is None:
        row = StationRow(name=ref.name, ae_title=ref.ae_title, mode=ref.mode, configured=ref.configured,
                         mode_since=now, created_at=now)
        session.add(row)
        audit.record(session, "station.added", calling_aet=ref.ae_title,
                     reason=None if ref.configured else "not in [[stations]]: mode from [onboarding] new_stations",
                     detail={"station": ref.name, "mode": ref.mode, "configured": ref.configured})
        log.info("new station %s (calling AE %s): %s", ref.name, ref.ae_title, ref.mode)
    elif row.mode != ref.mode or row.configured != ref.configured:
        _change(session, row, ref.mode, ref.configured, now)
    return row


def ensure(db: Database, refs: Iterable[StationRef]) -> None:
    """Make the rows of stations seen for the first time, each in its own short transaction, before
    the studies are recorded; a node sharing the database that made the same row first wins (its
    ``station.added`` stands) and the study is not failed for it."""
    from sqlalchemy.exc import IntegrityError

    for ref in {r.name: r for r in refs}.values():
        try:
            with db.transaction() as s:
                note(s, ref)
        except IntegrityError:
            log.info("station %s was added by another node meanwhile", ref.name)


def _change(session, row: StationRow, mode: str, is_configured: bool, now) -> None:  # noqa: ANN001
    if row.mode != mode:
        audit.record(session, "station.mode", calling_aet=row.ae_title,
                     reason=f"{row.mode} -> {mode}",
                     detail={"station": row.name, "from": row.mode, "to": mode, "configured": is_configured})
        log.warning("station %s: mode %s -> %s%s", row.name, row.mode, mode,
                    " (results made in shadow mode are kept: `cxr-node resend STUDY_UID` delivers them)"
                    if mode == ACTIVE else "")
        row.mode, row.mode_since = mode, now
    row.configured = is_configured


def sync(settings: Settings, db: Database) -> list[tuple[str, str, str]]:
    """At start-up: bring the stations table in line with the config, auditing every mode change
    (and a configured station not yet seen as ``station.added``). Returns (name, from, to) changes."""
    changes = []
    now = utcnow()
    with db.transaction() as s:
        rows = {r.name: r for r in s.scalars(select(StationRow).with_for_update())}
        for st in settings.stations:
            row = rows.get(st.name)
            if row is None:
                note(s, StationRef(st.name, st.ae_title, st.mode, True))
            elif row.mode != st.mode or not row.configured:
                changes.append((st.name, row.mode, st.mode))
                _change(s, row, st.mode, True, now)
        names = {st.name for st in settings.stations}
        for name, row in rows.items():
            if name not in names:
                mode = mode_of(settings, name)
                if row.mode != mode or row.configured:
                    changes.append((name, row.mode, mode))
                    _change(s, row, mode, False, now)
    return [c for c in changes if c[1] != c[2]]


# --------------------------------------------------------------------------- site calibration


def active_calibrations(db: Database) -> dict[str, SiteCalibration]:
    """station -> its active site calibration (any weights; callers check the binding)."""
    with db.session() as s:
        rows = list(s.scalars(select(SiteCalibration).where(SiteCalibration.active.is_(True))))
        for r in rows:
            s.expunge(r)
    return {r.station: r for r in rows}


def calibration_name(cal: SiteCalibration | None) -> str:
    return "model" if cal is None else f"site {cal.station} v{cal.version}"


# --------------------------------------------------------------------------- drift

#: The statistics drift compares, each a number per film (None where not known for that film).
def check_drift(settings: Settings, db: Database, station_names: Iterable[str], labels: Sequence[str],
                weights_sha256: str | None = None) -> dict[str, dict]:
    """Compare each station's last ``drift_window`` films with its reference and record the verdict.

    The reference is the films its active site calibration was fitted on; a station without one gets
    a baseline: its first ``drift_window`` films (recorded once, the first time there are enough).
    With fewer than ``drift_min_films`` films in the window there is no verdict. A station whose
    verdict turns to drifted is audited as ``station.drift`` (outcome warning) naming what moved;
    turning back is audited as ``station.drift_cleared``.
    """
    o = settings.onboarding
    if o is None:
        return {}
    from cxr_node.onboarding import site_adaptation

    cals = active_calibrations(db)
    heads = site_adaptation.active_heads(db)
    results = {}
    for name in station_names:
        with db.transaction() as s:
            row = s.get(StationRow, name, with_for_update=True)
            if row is None:
                continue
            recent = list(s.scalars(select(ImageResult).where(ImageResult.station == name)
                                    .order_by(ImageResult.id.desc()).limit(o.drift_window)))
            cal = cals.get(name)
            head = heads.get(name)
            if head is not None and (head.report or {}).get("reference") and (
                    weights_sha256 is None or head.weights_sha256 == weights_sha256):
                # site heads decide the station's films: their fitting films are the reference
                reference, ref_name = head.report["reference"], site_adaptation.head_name(head)
                ref_cal = ref_name
            elif cal is not None and cal.reference and (weights_sha256 is None or cal.weights_sha256 == weights_sha256):
                reference, ref_name = cal.reference, calibration_name(cal)
                ref_cal = ref_name
            else:
                if row.baseline is None:
                    if len(recent) < o.drift_window:
                        continue  # not enough films for a baseline yet
                    first = list(s.scalars(select(ImageResult).where(ImageResult.station == name)
                                           .order_by(ImageResult.id).limit(o.drift_window)))
                    row.baseline = reference_from(first, labels)
                    audit.record(s, "station.baseline", calling_aet=row.ae_title,
                                 detail={"station": name, "films": len(first)})
                reference, ref_name = row.baseline, "baseline (first films)"
                ref_cal = "model"
            if len(recent) < o.drift_min_films:
                continue
            verdict = compare(reference, recent, labels, o.drift_threshold, ref_cal)
            verdict["reference"] = ref_name
            state = "drifted" if verdict["moved"] else "ok"
            previous = row.drift_state
            row.drift_state, row.drift_detail, row.drift_checked_at = state, verdict, utcnow()
            if state == "drifted" and previous != "drifted":
                why = describe(verdict["moved"])
                audit.record(s, "station.drift", "warning", calling_aet=row.ae_title,
                             reason=f"past PSI {o.drift_threshold:g} against {ref_name}: {why}",
                             detail={"station": name, **verdict})
                log.warning("station %s has drifted from its reference (%s): %s", name, ref_name, why)
            elif state == "ok" and previous == "drifted":
                audit.record(s, "station.drift_cleared", calling_aet=row.ae_title,
                             detail={"station": name, "psi": verdict["psi"], "reference": ref_name})
            results[name] = verdict
    return results
