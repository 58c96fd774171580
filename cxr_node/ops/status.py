"""What ``cxr-node status`` shows, read from the database only, so it works whether or not the
daemon is running (uptime says which). The command itself is ``cxr_node.cli.status``."""

from __future__ import annotations

import json
from typing import Any, TextIO

from sqlalchemy import exists, func, select

from cxr_node.audit.backlog import AuditBacklog
from cxr_node.config import Settings, destinations_warning
from cxr_node.db.models import AuditEvent, ImageResult, OutboxItem, SiteCalibration, StationRow, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.eligibility.refusal import RefusalCode

#: How many of the newest studies ``status`` names (``cxr-node studies`` lists more).
RECENT = 3


def audit_backlog_count(settings: Settings) -> int:
    """Audit events the daemon kept on disk while the database was unreachable (not yet replayed)."""
    d = settings.storage.data_dir / "audit-backlog"
    return sum(AuditBacklog(d / name).pending()
               for name in {p.name.removesuffix(".replaying") for p in d.glob("*.jsonl*")})


def collect(settings: Settings, db: Database) -> dict[str, Any]:
    """Everything ``status`` shows, from an open database at the current schema."""
    with db.session() as s:
        states = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        priorities = dict(s.execute(select(Study.priority, func.count()).where(Study.priority.is_not(None))
                                    .group_by(Study.priority)).all())
        outbox = dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
        oldest = s.scalar(select(func.min(OutboxItem.created_at)).where(OutboxItem.state == "pending"))
        errors = _last_errors(s)
        started = s.scalars(select(AuditEvent).where(AuditEvent.event.in_(["node.started", "node.stopped"]))
                            .order_by(AuditEvent.id.desc()).limit(1)).first()
        config_row = s.scalars(select(AuditEvent).where(AuditEvent.event.in_(["node.started", "config.reloaded"]))
                               .order_by(AuditEvent.id.desc()).limit(1)).first()
        model = s.scalars(select(AuditEvent).where(AuditEvent.event == "image.triaged")
                          .order_by(AuditEvent.id.desc()).limit(1)).first()
        refused_codes = s.execute(select(ImageResult.refusal_code, func.count())
                                  .where(ImageResult.analysed.is_(False)).group_by(ImageResult.refusal_code)).all()
        never_queued = s.scalar(select(func.count()).select_from(Study).where(
            Study.last_sr_uid.is_not(None), ~exists().where(OutboxItem.study_uid == Study.study_uid)))
        # of those, the ones kept on purpose: their station was in shadow mode when they were analysed
        kept_shadow = s.scalar(select(func.count()).select_from(Study).where(
            Study.last_sr_uid.is_not(None), ~exists().where(OutboxItem.study_uid == Study.study_uid),
            exists().where(AuditEvent.study_uid == Study.study_uid, AuditEvent.event == "study.shadow")))
        station_rows = list(s.scalars(select(StationRow).order_by(StationRow.name)))
        cals = {c.station: c for c in s.scalars(select(SiteCalibration).where(SiteCalibration.active.is_(True)))}
    now = utcnow()
    backlog = audit_backlog_count(settings)
    not_analysed: dict[str, int] = {}
    for code, n in refused_codes:
        k = RefusalCode.of(code).value
        not_analysed[k] = not_analysed.get(k, 0) + n
    running = started is not None and started.event == "node.started"
    daemon = (config_row.detail or {}).get("running") if running and config_row is not None else None
    file_dests = [d.name for d in settings.destinations]
    config_warnings = []
    if daemon is not None:
        run_dests = [d["name"] for d in daemon.get("destinations", [])]
        if sorted(run_dests) != sorted(file_dests) or _differs(settings, daemon):
            config_warnings.append(
                f"the config file ({settings.source or 'built-in defaults'}) differs from what the running daemon "
                f"uses (since {config_row.ts.isoformat(timespec='seconds')}): reload it "
                f"(`systemctl reload cxr-node`, or `kill -HUP {daemon.get('pid', 'PID')}`)")
    station_list = [station_status(settings, r, cals.get(r.name)) for r in station_rows]
    drift_warnings = [f"station {st['name']} has drifted from {st['drift']['reference']}: {st['drift']['moved']}"
                      for st in station_list if st["drift"] and st["drift"]["state"] == "drifted"]
    return {
        "database": "ok",
        "running": running,
        "uptime_seconds": round((now - started.ts).total_seconds()) if running else None,
        "studies": states,
        "priorities": priorities,
        "films_not_analysed": not_analysed,
        "outbox": {"pending": outbox.get("pending", 0), "sent": outbox.get("sent", 0), "dead": outbox.get("dead", 0),
                   "oldest_pending_seconds": round((now - oldest).total_seconds()) if oldest else None},
        "model": {"configured": str(settings.model.checkpoint),
                  "last_used_version": model.detail.get("model_version") if model and model.detail else None},
        "audit_backlog": backlog,
        # what the running daemon sends to (from its last start or reload), else what the file says
        "destinations": [d["name"] for d in daemon["destinations"]] if daemon is not None else file_dests,
        "destinations_source": "running daemon" if daemon is not None else "config file",
        "running_config": daemon,
        "results_never_queued": never_queued - kept_shadow,
        "results_kept_shadow": kept_shadow,
        "stations_not_configured": [st["name"] for st in station_list if not st["configured"]],
        "stations": station_list,
        "warnings": [w for w in (destinations_warning(settings),) if w] + config_warnings + drift_warnings,
        "last_errors": [{"time": e.ts.isoformat(timespec="seconds"), "event": e.event, "reason": e.reason}
                        for e in errors],
        "recent_studies": recent_studies(db, RECENT)[0],
    }


def recent_studies(db: Database, limit: int, state: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` studies (by their last film received), as ``cxr-node studies`` and
    ``status`` show them, and how many there are in all (in ``state``, when given)."""
    q = select(Study)
    n = select(func.count()).select_from(Study)
    if state:
        q, n = q.where(Study.state == state), n.where(Study.state == state)
    with db.session() as s:
        rows = s.scalars(q.order_by(Study.last_received_at.desc(), Study.study_uid).limit(limit)).all()
        total = s.scalar(n)
    return [{"time": r.last_received_at.isoformat(timespec="seconds"), "patient_id": r.patient_id,
             "accession_number": r.accession_number, "state": r.state, "priority": r.priority,
             "study_uid": r.study_uid} for r in rows], total


def _last_errors(s, n: int = 5) -> list:
    """The newest ``n`` failures, leaving out send failures (outbox.retry, outbox.dead) of objects
    that have reached that destination since: they are no longer errors anyone must act on."""
    out, offset = [], 0
    while len(out) < n:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")
                         .order_by(AuditEvent.id.desc()).offset(offset).limit(50)).all()
        if not rows:
            break
        offset += len(rows)
        for e in rows:
            if e.event in ("outbox.dead", "outbox.retry") and e.sop_instance_uid and s.scalar(
                    select(OutboxItem.id).where(OutboxItem.sop_instance_uid == e.sop_instance_uid,
                                                OutboxItem.destination == (e.detail or {}).get("destination"),
                                                OutboxItem.state == "sent").limit(1)) is not None:
                continue
            out.append(e)
            if len(out) == n:
                break
    return out


def _differs(settings: Settings, daemon: dict[str, Any]) -> bool:
    """Whether the file's reloadable settings that status can compare differ from the daemon's."""
    from cxr_node.node.reload import running_summary

    mine = running_summary(settings)
    return any(mine.get(k) != daemon.get(k) for k in ("destinations", "stations", "new_stations",
                                                      "allowed_calling_aets", "allowed_hosts"))


def station_status(settings: Settings, row: StationRow, cal: SiteCalibration | None) -> dict[str, Any]:
    from cxr_node.onboarding import drift, stations

    d = row.drift_detail or {}
    return {"name": row.name, "ae_title": row.ae_title, "mode": stations.mode_of(settings, row.name),
            "configured": row.configured,
            "calibration": stations.calibration_name(cal),
            "drift": None if row.drift_state is None else {
                "state": row.drift_state, "reference": d.get("reference"), "films": d.get("n"),
                "moved": drift.describe(d.get("moved") or []) or None, "psi": d.get("psi"),
                "checked_at": row.drift_checked_at.isoformat(timespec="seconds") if row.drift_checked_at else None}}


def write_old_schema(why: str, fmt: str, out: TextIO) -> None:
    """The database answers, at an older (or newer) schema than this version's."""
    if fmt == "json":
        json.dump({"database": "old schema", "error": why}, out, indent=1)
        out.write("\n")
    else:
        out.write(f"database    SCHEMA NOT CURRENT: {why}\n")


def write_unreachable(why: str, backlog: int, fmt: str, out: TextIO) -> None:
    """What status knows while the database does not answer."""
    if fmt == "json":
        json.dump({"database": "unreachable", "error": why, "audit_backlog": backlog}, out, indent=1)
        out.write("\n")
    else:
        out.write(f"database    UNREACHABLE: {why}\n")
        out.write(f"audit       {backlog} event(s) kept on disk until the database answers again\n")


def write_status(st: dict[str, Any], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump(st, out, indent=1)
        out.write("\n")
        return
    up = st["uptime_seconds"]
    out.write(f"daemon      {'running, up ' + _dur(up) if st['running'] else 'not running (last event: stopped)'}\n")
    out.write("studies     " + (", ".join(f"{k} {v}" for k, v in sorted(st["studies"].items())) or "none") + "\n")
    for r in st.get("recent_studies", []):
        out.write(f"  {r['time']}  {r['state']:<10} {(r['priority'] or '-'):<8} {r['study_uid']}\n")
    if st.get("recent_studies"):
        out.write("            (the newest; `cxr-node studies` lists them all)\n")
    out.write("priority    " + (", ".join(f"{k} {v}" for k, v in sorted(st["priorities"].items())) or "-") + "\n")
    na = st.get("films_not_analysed") or {}
    out.write("not analysed " + (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(na.items())) or "none")
              + "  (films refused with a reason: cxr-node audit --event image.skipped)\n")
    ob = st["outbox"]
    oldest = f" (oldest waiting {_dur(ob['oldest_pending_seconds'])})" if ob["oldest_pending_seconds"] is not None else ""
    out.write(f"outbox      pending {ob['pending']}{oldest}, sent {ob['sent']}, dead {ob['dead']}\n")
    out.write("send to     " + (", ".join(st["destinations"]) or "NONE: no [[destinations]]")
              + (f"  ({st['destinations_source']})" if st.get("destinations_source") else "") + "\n")
    if st["results_never_queued"]:
        out.write(f"results     {st['results_never_queued']} stud{'y' if st['results_never_queued'] == 1 else 'ies'} "
                  "with results never queued for any destination (kept in data_dir/outbox; "
                  "`cxr-node resend STUDY_UID` sends them)\n")
    if st.get("results_kept_shadow"):
        k = st["results_kept_shadow"]
        out.write(f"shadow      {k} stud{'y' if k == 1 else 'ies'} analysed in shadow mode: results kept, not sent, "
                  "because the station is in shadow mode (as intended while the site is measured; `resend` only "
                  "the studies the site asks for)\n")
    for sta in st.get("stations", []):
        dr = sta["drift"]
        drift = ("drift: too few films yet" if dr is None else
                 f"DRIFTED from {dr['reference']}: {dr['moved']}" if dr["state"] == "drifted" else
                 f"drift ok ({dr['films']} recent films vs {dr['reference']})")
        out.write(f"station     {sta['name']} ({sta['ae_title'] or '-'}): {sta['mode'].upper()}, "
                  f"{sta['calibration']} calibration, {drift}\n")
    if st.get("stations_not_configured"):
        out.write(f"unlisted    {', '.join(st['stations_not_configured'])}: seen but not in [[stations]] (their mode "
                  "comes from [onboarding] new_stations; behind a PACS that forwards studies every film has the "
                  "PACS's AE title: tell stations apart with station_name / institution_name in [[stations]])\n")
    out.write(f"model       {st['model']['configured']}"
              + (f" (last used: {st['model']['last_used_version']})" if st["model"]["last_used_version"] else "") + "\n")
    if st["audit_backlog"]:
        out.write(f"audit       {st['audit_backlog']} event(s) kept on disk while the database was unreachable, "
                  "not yet replayed (the running daemon replays them)\n")
    for w in st["warnings"]:
        out.write(f"warning     {w}\n")
    out.write("last errors" + ("" if st["last_errors"] else " none") + "\n")
    for e in st["last_errors"]:
        out.write(f"  {e['time']}  {e['event']}: {e['reason']}\n")


def _dur(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
