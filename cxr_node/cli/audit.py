"""``cxr-node audit``: filter the audit trail and write it as a table, JSON or CSV; ``audit verify``;
``audit study UID``; ``audit export --format dicom-audit``."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
from typing import Any, TextIO

from cxr_node.cli._db import open_database
from cxr_node.config import Settings
from cxr_node.errors import ConfigError

_TABLE_COLUMNS = ("time", "event", "outcome", "calling_aet", "host", "study_uid", "sop_instance_uid",
                  "status", "reason")
#: The table (a person reading) shows the newest events first, this many unless --limit says otherwise;
#: JSON and CSV (a program reading) keep the trail's order and every row.
TABLE_LIMIT = 50


def parse_time(value: str, flag: str) -> dt.datetime:
    """ISO 8601; a date alone means midnight; no zone means UTC."""
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: not an ISO 8601 time (e.g. 2026-11-23 or 2026-11-23T08:00:00Z)")
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    a = sub.add_parser("audit", parents=[common], help="query the audit trail; `audit verify`; `audit study UID`",
                       description="Print audit events: as a table, the newest first, "
                       f"{TABLE_LIMIT} unless --limit says otherwise (--offset pages back); as JSON or CSV, "
                       "oldest first, every matching row. Times are ISO 8601, UTC; "
                       "a time without zone is UTC. `cxr-node audit verify` checks the hash chain and "
                       "exits 1 naming the first bad row; `cxr-node audit study UID` prints one "
                       "study's whole story in order.")
    a.add_argument("action", nargs="?", choices=["verify", "study", "export"],
                   help="verify the chain; one study's story; export (with --format dicom-audit)")
    a.add_argument("uid", nargs="?", metavar="UID", help="StudyInstanceUID for `audit study`")
    a.add_argument("--since", metavar="ISO", help="events at or after this time")
    a.add_argument("--until", metavar="ISO", help="events before this time")
    a.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    a.add_argument("--event", metavar="TYPE", action="append",
                   help="event type, e.g. instance.stored (repeatable); see `--event list`")
    a.add_argument("--calling-aet", metavar="AET", help="calling AE title of the association")
    a.add_argument("--patient-id", metavar="ID", help="PatientID")
    a.add_argument("--outcome", choices=["success", "failure", "warning"])
    a.add_argument("--limit", type=int, default=None,
                   help=f"at most this many rows (a page); the table shows the newest {TABLE_LIMIT} by default")
    a.add_argument("--offset", type=int, default=0, help="skip this many rows first (the next page)")
    a.add_argument("--format", choices=["table", "json", "csv", "dicom-audit"], default="table",
                   help="dicom-audit: PS3.15 A.5 DICOM Audit Messages (ATNA XML), one per line")
    a.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.audit import trail as audit

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
    table = args.format == "table"
    limit = args.limit if args.limit is not None or not table else TABLE_LIMIT
    q = audit.AuditQuery(
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        study_uid=args.study, events=tuple(args.event or ()), calling_aet=args.calling_aet,
        patient_id=args.patient_id, outcome=args.outcome, limit=limit, offset=args.offset, newest_first=table,
    )
    with open_database(settings) as db, db.session() as s:
        rows = audit.as_dicts(audit.query(s, q))
        total = audit.count(s, q) if table else len(rows)
    if table:
        _table(rows, total, args.offset, out)
        return 0
    write_rows(rows, args.format, out, settings.node.ae_title)
    return 0


def _table(rows: list[dict[str, Any]], total: int, offset: int, out: TextIO) -> None:
    """Newest first, aligned; the footer says how many of how many and how to see more."""
    from cxr_node.cli._table import plural, write_table

    footer = f"({plural(len(rows), 'event')}) newest first"
    if offset or len(rows) < total:
        footer += f", {offset + 1 if rows else offset}-{offset + len(rows)} of {total}"
        if offset + len(rows) < total:
            footer += (f". Older: --offset {offset + len(rows)}; more per page: --limit N; every row, oldest "
                       "first: --format csv or json")
    write_table(out, [c for c in _TABLE_COLUMNS],
                [[_time(r["time"]) if c == "time" else (None if r[c] is None else _cell(r[c])) for c in _TABLE_COLUMNS]
                 for r in rows], footer, wrap={"reason": 60})


def write_rows(rows: list[dict[str, Any]], fmt: str, out: TextIO, node_aet: str = "CXRNODE") -> None:
    from cxr_node.audit import trail as audit

    if fmt == "dicom-audit":
        import sys

        from cxr_node.audit.atna import write_messages

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
        _table(rows, len(rows), 0, out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0x100:
        return f"0x{v:04X}"
    return str(v)


def _verify(settings: Settings, out: TextIO) -> int:
    import sys

    from cxr_node.audit import trail as audit

    with open_database(settings) as db, db.session() as s:
        report = audit.verify_chain(s)
    if report.ok:
        out.write(f"audit trail intact: {report.rows} event(s), hash chain verified\n")
        return 0
    sys.stderr.write(f"cxr-node: audit trail TAMPERED: {report.problem}\n")
    out.write(f"first bad row: {report.first_bad_id}\n")
    return 1


def _study(settings: Settings, study_uid: str, fmt: str, out: TextIO) -> int:
    """Everything about one study in order, including the associations that brought it."""
    from cxr_node.audit import trail as audit

    with open_database(settings) as db, db.session() as s:
        rows = audit.study_story(s, study_uid)
    if not rows:
        raise ConfigError(f"no audit events for study {study_uid}")
    if fmt in ("json", "csv"):
        write_rows(rows, fmt, out)
        return 0
    from cxr_node.audit.story import sentence

    out.write(f"study {study_uid}\n")
    for r in rows:
        out.write(f"  {_time(r['time'])}  {r['event']:22} {sentence(r)}\n")
    return 0


def _time(iso: str | None) -> str:
    """'2026-12-02T01:45:12.123456+00:00' -> '2026-12-02T01:45:12Z' (UTC, to the second)."""
    if not iso:
        return "-"
    t = iso.replace("+00:00", "Z")
    return (t[:19] + "Z") if len(t) >= 19 else t
