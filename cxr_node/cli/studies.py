"""``cxr-node studies``: the studies the node knows, newest first, with the UID every other
command takes (``audit study``, ``resend``, ``reprocess``)."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from cxr_node.cli._db import open_database

STATES = ("receiving", "complete", "queued", "processing", "processed", "failed")


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("studies", parents=[common], help="the studies received, newest first, with their UIDs",
                       description="The studies the node has received, newest first (by the last film "
                       "received): time (UTC), patient ID, accession number (known once analysed), state, "
                       "priority and Study Instance UID, the UID that `cxr-node audit study`, `resend` and "
                       "`reprocess` take. Patient names are never shown.")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N studies (default 20)")
    p.add_argument("--state", choices=STATES, help="only studies in this state")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.cli._table import write_table
    from cxr_node.errors import ConfigError
    from cxr_node.ops.status import recent_studies

    if args.limit < 1:
        raise ConfigError(f"studies: --limit must be at least 1 (got {args.limit})")
    with open_database(settings) as db:
        rows, total = recent_studies(db, args.limit, args.state)
    if args.format == "json":
        json.dump(rows, out, indent=1)
        out.write("\n")
        return 0
    which = f" {args.state}" if args.state else ""
    n = len(rows)
    footer = (f"{n}{which} stud{'y' if n == 1 else 'ies'}, newest first" if n == total else
              f"the newest {n} of {total}{which} studies (--limit N shows more)")
    write_table(out, ["time", "patient", "accession", "state", "priority", "study_uid"],
                [[r["time"], r["patient_id"], r["accession_number"], r["state"], r["priority"], r["study_uid"]]
                 for r in rows], footer)
    return 0
