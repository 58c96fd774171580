"""``cxr-node status``: what an admin checks first."""

from __future__ import annotations

import argparse
from typing import TextIO

from cxr_node.cli._db import open_database, require_existing


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser("status", parents=[common],
                       help="studies by state, outbox depth, dead letters, destinations, last errors, uptime",
                       description="Read from the database only, so it works whether or not the daemon runs. "
                       "Exit 1 when the database does not answer (with what is known without it).")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:  # noqa: ANN001 - Settings
    """0 when the database answers; 1, with what is known without it, when it does not."""
    from sqlalchemy.exc import SQLAlchemyError

    from cxr_node.ops import status
    from cxr_node.errors import DatabaseError, SchemaError, db_error_text

    require_existing(settings)  # no database at all is a wrong --config, not an outage
    try:
        with open_database(settings) as db:
            st = status.collect(settings, db)
    except SchemaError as e:  # it answers: an upgrade is due, not an outage
        status.write_old_schema(str(e), args.format, out)
        return 1
    except (DatabaseError, SQLAlchemyError) as e:
        why = str(e) if isinstance(e, DatabaseError) else db_error_text(e)
        status.write_unreachable(why, status.audit_backlog_count(settings), args.format, out)
        return 1
    status.write_status(st, args.format, out)
    return 0
