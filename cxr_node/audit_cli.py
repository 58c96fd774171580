"""``cxr-node audit``: filter the audit trail and write it as a table, JSON or CSV."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
from typing import Any, TextIO

from cxr_node import audit
from cxr_node.config import Settings
from cxr_node.db.session import Database
from cxr_node.errors import ConfigError

_TABLE_COLUMNS = ("time", "event", "outcome", "calling_aet", "host", "study_uid", "sop_instance_uid",
                  "status", "reason")


def parse_time(value: str, flag: str) -> dt.datetime:
    """ISO 8601; a date alone means midnight; no zone means UTC."""
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: not an ISO 8601 time (e.g. 2026-11-23 or 2026-11-23T08:00:00Z)")
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def run_audit(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "verify":
        return _verify(settings, out)
    if args.action == "study":
        if not args.uid:
            raise ConfigError("audit study: give the StudyInstanceUID")
        return _study(settings, args.uid, args.format, out)
    if args.format == "dicom-audit" and args.action not in ("export", None):
        raise ConfigError("--format dicom-audit goes with `audit export` or a plain query")
    if args.event and "list" in args.event:
        for name, text in audit.EVENTS.items():
            out.write(f"{name:26} {text}\n")
        return 0
    unknown = [e for e in (args.event or []) if e not in audit.EVENTS]
    if unknown:
        raise ConfigError(f"--event {unknown[0]!r}: unknown event type (see `cxr-node audit --event list`)")
    q = audit.AuditQuery(
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        study_uid=args.study, events=tuple(args.event or ()), calling_aet=args.calling_aet,
        patient_id=args.patient_id, outcome=args.outcome, limit=args.limit, offset=args.offset,
    )
    db = Database(settings.database.url)
    try:
        db.require_current_schema()
        with db.session() as s:
            rows = audit.as_dicts(audit.query(s, q))
    finally:
        db.dispose()
    write_rows(rows, args.format, out, settings.node.ae_title)
    return 0


def write_rows(rows: list[dict[str, Any]], fmt: str, out: TextIO, node_aet: str = "CXRNODE") -> None:
    if fmt == "dicom-audit":
        import sys

        from cxr_node.audit_dicom import write_messages

        written, skipped = write_messages(rows, node_aet, out)
        sys.stderr.write(f"{written} DICOM audit message(s); {skipped} event(s) without a DICOM audit meaning\n")
        return
    if fmt == "json":
        json.dump(rows, out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        w = csv.DictWriter(out, fieldnames=list(audit.FIELDS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else v) for k, v in r.items()})
    else:
        cells = [[_cell(r[c]) for c in _TABLE_COLUMNS] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(_TABLE_COLUMNS)]
        out.write("  ".join(c.upper().ljust(w) for c, w in zip(_TABLE_COLUMNS, widths)).rstrip() + "\n")
        for row in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
        out.write(f"({len(rows)} event{'s' if len(rows) != 1 else ''})\n")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0x100:
        return f"0x{v:04X}"
    return str(v)


def _verify(settings: Settings, out: TextIO) -> int:
    import sys

    db = Database(settings.database.url)
    try:
        db.require_current_schema()
        with db.session() as s:
            report = audit.verify_chain(s)
    finally:
        db.dispose()
    if report.ok:
        out.write(f"audit trail intact: {report.rows} event(s), hash chain verified\n")
        return 0
    sys.stderr.write(f"cxr-node: audit trail TAMPERED: {report.problem}\n")
    out.write(f"first bad row: {report.first_bad_id}\n")
    return 1


_STORY = {
    "association.opened": lambda r: f"association from {r['calling_aet']}@{r['host']}:{r['port']}",
    "instance.stored": lambda r: f"stored {r['sop_instance_uid']} ({r['bytes']} bytes, {r['transfer_syntax']})",
    "instance.duplicate": lambda r: f"duplicate {r['sop_instance_uid']}",
    "image.triaged": lambda r: (f"triaged {r['sop_instance_uid']}: {r['detail']['top_label']} "
                                f"{max(r['detail']['probabilities'].values()):.3f}, {r['detail']['priority']}"
                                f"{' URGENT' if r['detail']['urgent'] else ''} (model {r['detail']['model_version']})"),
    "image.skipped": lambda r: f"not analysed {r['sop_instance_uid']}: {r['reason']}",
    "outbox.sent": lambda r: f"sent {r['sop_instance_uid']} to {r['detail']['destination']}: {r['reason']}",
    "outbox.retry": lambda r: f"send of {r['sop_instance_uid']} to {r['detail']['destination']} failed: {r['reason']}",
    "outbox.dead": lambda r: f"gave up sending {r['sop_instance_uid']} to {r['detail']['destination']}: {r['reason']}",
}


def _study(settings: Settings, study_uid: str, fmt: str, out: TextIO) -> int:
    """Everything about one study in order, including the associations that brought it."""
    db = Database(settings.database.url)
    try:
        db.require_current_schema()
        with db.session() as s:
            own = audit.as_dicts(audit.query(s, audit.AuditQuery(study_uid=study_uid)))
            assoc_ids = {r["association_id"] for r in own if r["association_id"]}
            assoc = [r for r in audit.as_dicts(audit.query(s, audit.AuditQuery(
                events=("association.opened", "association.accepted", "association.released", "association.aborted"))))
                if r["association_id"] in assoc_ids]
    finally:
        db.dispose()
    rows = sorted(own + assoc, key=lambda r: r["id"])
    if not rows:
        raise ConfigError(f"no audit events for study {study_uid}")
    if fmt in ("json", "csv"):
        write_rows(rows, fmt, out)
        return 0
    out.write(f"study {study_uid}\n")
    for r in rows:
        text = _STORY.get(r["event"])
        if text:
            line = text(r)
        else:
            line = r["reason"] or (json.dumps(r["detail"]) if r["detail"] else "")
        out.write(f"  {r['time']}  {r['event']:22} {line}\n")
    return 0
