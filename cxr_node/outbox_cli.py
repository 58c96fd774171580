"""``cxr-node outbox list|retry|purge`` for admins."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from cxr_node.config import Settings
from cxr_node.db.session import Database
from cxr_node.errors import ConfigError
from cxr_node.outbox import DEAD, DONE, Outbox

FIELDS = ("id", "state", "destination", "kind", "study_uid", "study_version", "sop_instance_uid", "attempts",
          "next_attempt_at", "last_status", "last_error", "created_at", "sent_at")


def run_outbox(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    db = Database(settings.database.url)
    try:
        db.require_current_schema()
        box = Outbox(settings, db)
        if args.outbox_command == "list":
            rows = [_row(i) for i in box.list(args.state)]
            if args.format == "json":
                json.dump(rows, out, indent=1)
                out.write("\n")
            else:
                cols = ("id", "state", "destination", "kind", "attempts", "sop_instance_uid", "last_error")
                out.write("  ".join(c.upper() for c in cols) + "\n")
                for r in rows:
                    out.write("  ".join("-" if r[c] is None else str(r[c]) for c in cols) + "\n")
                out.write(f"({len(rows)} item{'s' if len(rows) != 1 else ''})\n")
        elif args.outbox_command == "retry":
            if not args.ids and not args.all_dead:
                raise ConfigError("outbox retry: give item IDs or --all-dead")
            out.write(f"{box.retry(args.ids, all_dead=args.all_dead)} item(s) pending again\n")
        else:
            states = [s for s, on in ((DONE, args.sent), (DEAD, args.dead)) if on]
            if not states:
                raise ConfigError("outbox purge: say what to purge: --sent and/or --dead")
            out.write(f"{box.purge(states, args.older_than)} item(s) purged\n")
    finally:
        db.dispose()
    return 0


def _row(item) -> dict:  # noqa: ANN001
    d = {f: getattr(item, f) for f in FIELDS}
    for k in ("next_attempt_at", "created_at", "sent_at"):
        if d[k] is not None:
            d[k] = d[k].isoformat(timespec="seconds").replace("+00:00", "Z")
    return d
