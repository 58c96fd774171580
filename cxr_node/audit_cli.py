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
        study_uid=args.study, events=tuple(args.event or ()), calling_aet=args.calling_aet, limit=args.limit,
    )
    db = Database(settings.database.url)
    try:
        db.require_current_schema()
        with db.session() as s:
            rows = audit.as_dicts(audit.query(s, q))
    finally:
        db.dispose()
    write_rows(rows, args.format, out)
    return 0


def write_rows(rows: list[dict[str, Any]], fmt: str, out: TextIO) -> None:
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
