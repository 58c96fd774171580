"""``cxr-node status``: what an admin checks first. Read from the database only, so it works
whether or not the daemon is running (uptime says which)."""

from __future__ import annotations

import json
from typing import Any, TextIO

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cxr_node.audit_backlog import AuditBacklog
from cxr_node.config import Settings
from cxr_node.db.models import AuditEvent, OutboxItem, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import DatabaseError, db_error_text


def audit_backlog_count(settings: Settings) -> int:
    """Audit events the daemon kept on disk while the database was unreachable (not yet replayed)."""
    d = settings.storage.data_dir / "audit-backlog"
    return sum(AuditBacklog(d / name).pending()
               for name in {p.name.removesuffix(".replaying") for p in d.glob("*.jsonl*")})


def collect(settings: Settings) -> dict[str, Any]:
    db = Database(settings.database.url)
    try:
        db.require_current_schema()
        with db.session() as s:
            states = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            priorities = dict(s.execute(select(Study.priority, func.count()).where(Study.priority.is_not(None))
                                        .group_by(Study.priority)).all())
            outbox = dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
            oldest = s.scalar(select(func.min(OutboxItem.created_at)).where(OutboxItem.state == "pending"))
            errors = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")
                               .order_by(AuditEvent.id.desc()).limit(5)).all()
            started = s.scalars(select(AuditEvent).where(AuditEvent.event.in_(["node.started", "node.stopped"]))
                                .order_by(AuditEvent.id.desc()).limit(1)).first()
            model = s.scalars(select(AuditEvent).where(AuditEvent.event == "image.triaged")
                              .order_by(AuditEvent.id.desc()).limit(1)).first()
    finally:
        db.dispose()
    now = utcnow()
    backlog = audit_backlog_count(settings)
    running = started is not None and started.event == "node.started"
    return {
        "database": "ok",
        "running": running,
        "uptime_seconds": round((now - started.ts).total_seconds()) if running else None,
        "studies": states,
        "priorities": priorities,
        "outbox": {"pending": outbox.get("pending", 0), "sent": outbox.get("sent", 0), "dead": outbox.get("dead", 0),
                   "oldest_pending_seconds": round((now - oldest).total_seconds()) if oldest else None},
        "model": {"configured": str(settings.model.checkpoint),
                  "last_used_version": model.detail.get("model_version") if model and model.detail else None},
        "audit_backlog": backlog,
        "last_errors": [{"time": e.ts.isoformat(timespec="seconds"), "event": e.event, "reason": e.reason}
                        for e in errors],
    }


def run_status(settings: Settings, fmt: str, out: TextIO) -> int:
    """0 when the database answers; 1, with what is known without it, when it does not."""
    try:
        st = collect(settings)
    except (DatabaseError, SQLAlchemyError) as e:
        why = str(e) if isinstance(e, DatabaseError) else db_error_text(e)
        backlog = audit_backlog_count(settings)
        if fmt == "json":
            json.dump({"database": "unreachable", "error": why, "audit_backlog": backlog}, out, indent=1)
            out.write("\n")
        else:
            out.write(f"database    UNREACHABLE: {why}\n")
            out.write(f"audit       {backlog} event(s) kept on disk until the database answers again\n")
        return 1
    if fmt == "json":
        json.dump(st, out, indent=1)
        out.write("\n")
        return 0
    up = st["uptime_seconds"]
    out.write(f"daemon      {'running, up ' + _dur(up) if st['running'] else 'not running (last event: stopped)'}\n")
    out.write("studies     " + (", ".join(f"{k} {v}" for k, v in sorted(st["studies"].items())) or "none") + "\n")
    out.write("priority    " + (", ".join(f"{k} {v}" for k, v in sorted(st["priorities"].items())) or "-") + "\n")
    ob = st["outbox"]
    oldest = f" (oldest waiting {_dur(ob['oldest_pending_seconds'])})" if ob["oldest_pending_seconds"] is not None else ""
    out.write(f"outbox      pending {ob['pending']}{oldest}, sent {ob['sent']}, dead {ob['dead']}\n")
    out.write(f"model       {st['model']['configured']}"
              + (f" (last used: {st['model']['last_used_version']})" if st["model"]["last_used_version"] else "") + "\n")
    if st["audit_backlog"]:
        out.write(f"audit       {st['audit_backlog']} event(s) kept on disk while the database was unreachable, "
                  "not yet replayed (the running daemon replays them)\n")
    out.write("last errors" + ("" if st["last_errors"] else " none") + "\n")
    for e in st["last_errors"]:
        out.write(f"  {e['time']}  {e['event']}: {e['reason']}\n")
    return 0


def _dur(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
