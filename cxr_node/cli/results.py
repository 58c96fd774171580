"""``cxr-node resend`` and ``cxr-node reprocess``: a study's results to the PACS again, or a new
analysis of it. Both are audited (``outbox.resend``, ``study.reprocess``) and both leave the work
to the running daemon (its outbox and its worker pick it up within seconds)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from cxr_node.cli._db import open_database
from cxr_node.errors import ConfigError, CxrNodeError


def register(sub, common: argparse.ArgumentParser) -> None:
    rs = sub.add_parser("resend", parents=[common], help="queue studies' kept results (SC + SR) for a destination again",
                        description="Queue each study's current results (its Secondary Captures and its last SR, "
                        "kept in data_dir/outbox) for every destination, or the one named by --to: results "
                        "made while no destination was configured, or ones a PACS lost. The running "
                        "daemon sends them: after adding the destination, reload it first (`systemctl reload cxr-node`, "
                        "`make reload`, or `kill -HUP PID`), so that it knows the destination.")
    rs.add_argument("studies", nargs="+", metavar="STUDY_UID")
    rs.add_argument("--to", metavar="NAME", action="append",
                    help="a [[destinations]] name (repeatable; default: every destination)")
    rs.set_defaults(run=run_resend)

    rp = sub.add_parser("reprocess", parents=[common], help="analyse studies again (new SR version naming the old one)",
                        description="Queue processed or failed studies for analysis again, e.g. after a model "
                        "upgrade. Each gets a new version; its new SR names the previous SR as predecessor. "
                        "The running daemon analyses them and sends the results.")
    rp.add_argument("studies", nargs="*", metavar="STUDY_UID")
    rp.add_argument("--since", metavar="ISO",
                    help="every processed or failed study that received an instance at or after this time")
    rp.set_defaults(run=run_reprocess)


def run_resend(settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.config import destinations_warning
    from cxr_node.outbox.queue import Outbox

    if not settings.destinations:
        raise ConfigError(destinations_warning(settings))
    names = list(dict.fromkeys(args.to)) if args.to else [d.name for d in settings.destinations]
    for name in names:
        settings.destination(name)  # fail before touching anything
    failed = 0
    with open_database(settings) as db:
        box = Outbox(settings, db)
        for uid in dict.fromkeys(args.studies):
            try:
                r = box.resend(uid, names)
            except ConfigError:
                raise
            except CxrNodeError as e:
                failed += 1
                sys.stderr.write(f"cxr-node: {e}\n")
                continue
            out.write(f"{uid}: {r['objects']} result object(s) for {', '.join(names)}: {r['queued']} queued, "
                      f"{r['requeued']} sent again, {r['already_pending']} already waiting\n")
            if r["missing"]:
                out.write(f"  {len(r['missing'])} file(s) no longer on disk (retention): "
                          f"`cxr-node reprocess {uid}` makes new ones\n")
    return 1 if failed else 0


def run_reprocess(settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.cli.audit import parse_time
    from cxr_node.study import states as studies

    if not args.studies and not args.since:
        raise ConfigError("reprocess: give STUDY_UIDs or --since ISO")
    failed = 0
    with open_database(settings) as db:
        uids = list(args.studies)
        if args.since:
            found = studies.finished_since(db, parse_time(args.since, "--since"))
            if not found:
                out.write(f"no processed or failed study received since {args.since}\n")
            uids += found
        for uid in dict.fromkeys(uids):
            try:
                version = studies.reprocess(db, uid)
            except CxrNodeError as e:
                failed += 1
                sys.stderr.write(f"cxr-node: {e}\n")
                continue
            out.write(f"{uid}: queued for analysis as version {version}\n")
    return 1 if failed else 0
