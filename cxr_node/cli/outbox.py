"""``cxr-node outbox list|retry|purge`` for admins."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from cxr_node.cli._db import open_database
from cxr_node.config import Settings
from cxr_node.errors import ConfigError

FIELDS = ("id", "state", "destination", "kind", "study_uid", "study_version", "sop_instance_uid", "attempts",
          "next_attempt_at", "last_status", "last_error", "created_at", "sent_at")


def register(sub, common: argparse.ArgumentParser) -> None:
    ob = sub.add_parser("outbox", parents=[common], help="list, retry or purge results waiting to be sent",
                        description="The outbox holds result objects (Secondary Captures, SRs) for each "
                        "destination: pending (to send or retrying), sent, or dead (gave up; see last_error). "
                        "`cxr-node resend` queues a study's results again.")
    obs = ob.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    ol = obs.add_parser("list", parents=[common], help="list outbox items")
    ol.add_argument("--state", choices=["pending", "sent", "dead"])
    ol.add_argument("--format", choices=["table", "json"], default="table")
    ol.add_argument("--notifications", action="store_true",
                    help="list the urgent notifications ([[notifications]]: HL7 v2, FHIR) instead of the items")
    orr = obs.add_parser("retry", parents=[common], help="put dead items (or the given IDs) back to pending, due now")
    orr.add_argument("ids", nargs="*", metavar="ID", help="item IDs; nN for notification N (e.g. n3)")
    orr.add_argument("--all-dead", action="store_true", help="every dead item and dead notification")
    op = obs.add_parser("purge", parents=[common],
                        help="delete sent and/or dead items and their files (never pending ones)")
    op.add_argument("--sent", action="store_true")
    op.add_argument("--dead", action="store_true")
    op.add_argument("--older-than", type=float, metavar="DAYS", help="only items created more than DAYS ago")
    ob.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.outbox.queue import DEAD, DONE, Outbox

    with open_database(settings) as db:
        box = Outbox(settings, db)
        if args.outbox_command == "list" and args.notifications:
            _list_notifications(box, args, out)
        elif args.outbox_command == "list":
            rows = [_row(i) for i in box.list(args.state)]
            if args.format == "json":
                json.dump(rows, out, indent=1)
                out.write("\n")
            else:
                from cxr_node.cli._table import plural, write_table

                cols = ("id", "state", "destination", "kind", "attempts", "created_at", "sop_instance_uid",
                        "last_error")
                write_table(out, cols, [[r[c] for c in cols] for r in rows], f"({plural(len(rows), 'item')})",
                            wrap={"last_error": 60})
        elif args.outbox_command == "retry":
            if not args.ids and not args.all_dead:
                raise ConfigError("outbox retry: give item IDs (nN for notification N) or --all-dead")
            ids, nids = _parse_ids(args.ids)
            n = box.retry(ids, all_dead=args.all_dead) if ids or args.all_dead else 0
            m = box.notifier.retry(nids, all_dead=args.all_dead) if nids or args.all_dead else 0
            out.write(f"{n} item(s) pending again" + (f", {m} notification(s)" if m or nids else "") + "\n")
        else:
            states = [s for s, on in ((DONE, args.sent), (DEAD, args.dead)) if on]
            if not states:
                raise ConfigError("outbox purge: say what to purge: --sent and/or --dead")
            out.write(f"{box.purge(states, args.older_than)} item(s) purged\n")
    return 0


def _row(item) -> dict:
    d = {f: getattr(item, f) for f in FIELDS}
    for k in ("next_attempt_at", "created_at", "sent_at"):
        if d[k] is not None:
            d[k] = d[k].isoformat(timespec="seconds").replace("+00:00", "Z")
    return d


def _parse_ids(values: list[str]) -> tuple[list[int], list[int]]:
    ids, nids = [], []
    for v in values:
        n = v[1:] if v[:1].lower() == "n" else v
        if not n.isdigit():
            raise ConfigError(f"outbox retry: {v!r} is not an item ID (N) or a notification ID (nN)")
        (nids if n is not v else ids).append(int(n))
    return ids, nids


NOTIFICATION_FIELDS = ("id", "state", "channel", "kind", "study_uid", "study_version", "call", "priority",
                       "correction", "attempts", "next_attempt_at", "last_status", "last_error", "created_at",
                       "sent_at")


def _list_notifications(box, args, out: TextIO) -> None:
    rows = []
    for n in box.notifier.list(args.state):
        d = {f: getattr(n, f) for f in NOTIFICATION_FIELDS}
        for k in ("next_attempt_at", "created_at", "sent_at"):
            if d[k] is not None:
                d[k] = d[k].isoformat(timespec="seconds").replace("+00:00", "Z")
        d["id"] = f"n{d['id']}"
        rows.append(d)
    if args.format == "json":
        json.dump(rows, out, indent=1)
        out.write("\n")
        return
    from cxr_node.cli._table import plural, write_table

    cols = ("id", "state", "channel", "kind", "call", "priority", "correction", "attempts", "created_at", "study_uid",
            "last_error")
    write_table(out, cols, [[r[c] for c in cols] for r in rows], f"({plural(len(rows), 'notification')})",
                wrap={"last_error": 60})
