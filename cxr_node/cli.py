"""The ``cxr-node`` command line: parse, call, print. Nothing heavy is imported up front.

Exit codes: 0 success, 1 an operation failed (the message says why), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from cxr_node import __version__
from cxr_node.errors import ConfigError, CxrNodeError

log = logging.getLogger("cxr_node")

EPILOG = """\
configuration: --config FILE or the CXR_NODE_CONFIG environment variable names a TOML file;
config/cxr-node.toml documents every key. Without either, built-in defaults apply.

examples:
  cxr-node --config config/cxr-node.toml db upgrade
  cxr-node --config config/cxr-node.toml serve
  cxr-node echo --to pacs
  cxr-node audit --since 2026-11-01 --event instance.stored --format csv
  cxr-node audit verify
  cxr-node audit study 1.2.840.113619.2.55.3
  cxr-node triage film.dcm --overlay-dir overlays/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-node",
        description="PACS companion daemon: receives chest X-rays over DICOM, triages them, "
        "and sends results back to the PACS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: $CXR_NODE_CONFIG)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("serve", help="run the DICOM receiver and the study scheduler in the foreground",
                   description="Run the Storage SCP and the study scheduler until SIGTERM/SIGINT. "
                   "On SIGTERM it stops accepting associations, finishes in-flight stores and exits 0.")

    db = sub.add_parser("db", help="database migrations (upgrade, downgrade, current)")
    dbs = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dbs.add_parser("upgrade", help="migrate the audit database to the newest schema (or REVISION)")
    up.add_argument("revision", nargs="?", default="head")
    down = dbs.add_parser("downgrade", help="migrate the audit database down to REVISION (e.g. -1, base)")
    down.add_argument("revision")
    dbs.add_parser("current", help="print the database's schema revision")

    sub.add_parser("check-config", help="validate the config file and print the effective settings")

    status = sub.add_parser("status", help="studies by state, outbox depth, dead letters, last errors, uptime")
    status.add_argument("--format", choices=["table", "json"], default="table")

    echo = sub.add_parser("echo", help="C-ECHO a configured destination")
    echo.add_argument("--to", required=True, metavar="NAME", help="a [[destinations]] name")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    audit = sub.add_parser("audit", help="query the audit trail; `audit verify`; `audit study UID`",
                           description="Print audit events, oldest first. Times are ISO 8601; "
                           "a time without zone is UTC. `cxr-node audit verify` checks the hash chain and "
                           "exits 1 naming the first bad row; `cxr-node audit study UID` prints one "
                           "study's whole story in order.")
    audit.add_argument("action", nargs="?", choices=["verify", "study", "export"],
                       help="verify the chain; one study's story; export (with --format dicom-audit)")
    audit.add_argument("uid", nargs="?", metavar="UID", help="StudyInstanceUID for `audit study`")
    audit.add_argument("--since", metavar="ISO", help="events at or after this time")
    audit.add_argument("--until", metavar="ISO", help="events before this time")
    audit.add_argument("--study", metavar="UID", help="StudyInstanceUID")
    audit.add_argument("--event", metavar="TYPE", action="append",
                       help="event type, e.g. instance.stored (repeatable); see `--event list`")
    audit.add_argument("--calling-aet", metavar="AET", help="calling AE title of the association")
    audit.add_argument("--patient-id", metavar="ID", help="PatientID")
    audit.add_argument("--outcome", choices=["success", "failure", "warning"])
    audit.add_argument("--limit", type=int, default=None, help="at most this many rows (a page)")
    audit.add_argument("--offset", type=int, default=0, help="skip this many rows first (the next page)")
    audit.add_argument("--format", choices=["table", "json", "csv", "dicom-audit"], default="table",
                       help="dicom-audit: PS3.15 A.5 DICOM Audit Messages (ATNA XML), one per line")

    ob = sub.add_parser("outbox", help="list, retry or purge results waiting to be sent",
                        description="The outbox holds result objects (Secondary Captures, SRs) for each "
                        "destination: pending (to send or retrying), sent, or dead (gave up; see last_error).")
    obs = ob.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    ol = obs.add_parser("list", help="list outbox items")
    ol.add_argument("--state", choices=["pending", "sent", "dead"])
    ol.add_argument("--format", choices=["table", "json"], default="table")
    orr = obs.add_parser("retry", help="put dead items (or the given IDs) back to pending, due now")
    orr.add_argument("ids", nargs="*", type=int, metavar="ID")
    orr.add_argument("--all-dead", action="store_true", help="every dead item")
    op = obs.add_parser("purge", help="delete sent and/or dead items and their files (never pending ones)")
    op.add_argument("--sent", action="store_true")
    op.add_argument("--dead", action="store_true")
    op.add_argument("--older-than", type=float, metavar="DAYS", help="only items created more than DAYS ago")

    ret = sub.add_parser("retention", help="run the retention job now (as the daemon does hourly)",
                         description="Delete spooled films and sent result files older than [retention] days "
                         "(or --days). Nothing of a study with pending or dead-lettered results is removed.")
    ret.add_argument("--days", type=float, help="override [retention] days for this run")

    tri = sub.add_parser("triage", help="triage image files offline (DICOM, PNG or JPEG)",
                         description="Per file: class probabilities, top class, urgent flag and model "
                         "version. A file that cannot be used gets an error line; the others are "
                         "still processed and the exit status is 1. DICOM files whose header says "
                         "they are not a frontal chest film (BodyPartExamined, ViewPosition) are "
                         "refused with the reason, as the daemon does.")
    tri.add_argument("files", nargs="+", metavar="FILE")
    tri.add_argument("--checkpoint", metavar="PATH", help="model checkpoint (default: [model] checkpoint)")
    tri.add_argument("--overlay-dir", metavar="DIR", help="write a Grad-CAM overlay PNG per file here")
    tri.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    tri.add_argument("--format", choices=["table", "json"], default="table")
    tri.add_argument("--any-film", action="store_true",
                     help="triage DICOM files whose header says they are not a frontal chest film")
    return p


def _setup_logging(level: str) -> None:
    from cxr_node.logs import configure

    configure(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cxr_node import config as cfgmod

    try:
        settings = cfgmod.load(cfgmod.config_path_from(args.config))
    except ConfigError as e:
        print(f"cxr-node: invalid configuration: {e}", file=sys.stderr)
        return 2
    _setup_logging(settings.logging.level)
    try:
        return _dispatch(args, settings)
    except ConfigError as e:
        print(f"cxr-node: {e}", file=sys.stderr)
        return 2
    except CxrNodeError as e:
        print(f"cxr-node: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `cxr-node audit | head`
        sys.stderr.close()
        return 0


def _dispatch(args: argparse.Namespace, settings) -> int:  # noqa: ANN001 - Settings
    cmd = args.command
    if cmd == "serve":
        from cxr_node.service import serve

        return serve(settings)
    if cmd == "db":
        from cxr_node.db import migrate

        if args.db_command == "upgrade":
            migrate.upgrade(settings.database.url, args.revision)
            print(f"database at revision {migrate.current(settings.database.url)}")
        elif args.db_command == "downgrade":
            migrate.downgrade(settings.database.url, args.revision)
            print(f"database at revision {migrate.current(settings.database.url) or 'base'}")
        else:
            print(migrate.current(settings.database.url) or "base (empty database)")
        return 0
    if cmd == "check-config":
        return _check_config(settings)
    if cmd == "status":
        from cxr_node.status import run_status

        return run_status(settings, args.format, sys.stdout)
    if cmd == "echo":
        from cxr_node.send import echo

        dest = settings.destination(args.to)
        status = echo(settings, dest, timeout=args.timeout)
        print(f"C-ECHO {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{' over TLS' if dest.tls else ''}): "
              f"status 0x{status:04X} "
              + ("Success" if status == 0 else "failed"))
        return 0 if status == 0 else 1
    if cmd == "audit":
        from cxr_node.audit_cli import run_audit

        return run_audit(settings, args, sys.stdout)
    if cmd == "outbox":
        from cxr_node.outbox_cli import run_outbox

        return run_outbox(settings, args, sys.stdout)
    if cmd == "retention":
        from cxr_node.db.session import Database
        from cxr_node.retention import run_retention

        db = Database(settings.database.url)
        try:
            db.require_current_schema()
            r = run_retention(settings, db, args.days)
        finally:
            db.dispose()
        print(f"removed {r.films} film(s) and {r.results} sent result file(s); kept {r.kept_unsent} not yet done")
        return 0
    if cmd == "triage":
        from cxr_node.triage_cli import run_triage

        return run_triage(settings, args, sys.stdout)
    raise AssertionError(f"unhandled command {cmd}")  # argparse guarantees a known command


def _check_config(settings) -> int:  # noqa: ANN001
    n = settings.node
    where = settings.source or "built-in defaults"
    print(f"configuration OK: {where}")
    print(f"  node        {n.ae_title} on {n.host}:{n.port} (max PDU {n.max_pdu})")
    print(f"  calling AEs {', '.join(n.allowed_calling_aets) or 'any'}")
    print(f"  hosts       {', '.join(map(str, n.allowed_hosts)) or 'any'}")
    print(f"  data_dir    {settings.storage.data_dir}")
    print(f"  database    {_redact_url(settings.database.url)}")
    print(f"  quiet       {settings.study.quiet_seconds:g} s")
    print(f"  model       {settings.model.checkpoint} (device {settings.model.device})")
    for d in settings.destinations:
        print(f"  destination {d.name}: {d.ae_title}@{d.host}:{d.port}")
    return 0


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
