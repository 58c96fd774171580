"""``cxr-node db upgrade|downgrade|current``: Alembic migrations of the audit database."""

from __future__ import annotations

import argparse
from typing import TextIO

from cxr_node.cli._db import open_database


def register(sub, common: argparse.ArgumentParser) -> None:
    db = sub.add_parser("db", parents=[common], help="database migrations (upgrade, downgrade, current)",
                        description="`db upgrade` creates the database if there is none; `downgrade` and "
                        "`current` need an existing one.")
    dbs = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dbs.add_parser("upgrade", parents=[common],
                        help="create or migrate the audit database to the newest schema (or REVISION)")
    up.add_argument("revision", nargs="?", default="head")
    down = dbs.add_parser("downgrade", parents=[common],
                          help="migrate the audit database down to REVISION (e.g. -1, base)")
    down.add_argument("revision")
    dbs.add_parser("current", parents=[common], help="print the database's schema revision")
    db.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.db import migrate

    url = settings.database.url
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
        with open_database(settings, check_schema=False) as db:
            db.restrict_permissions()
            out.write(f"database at revision {migrate.current(url, engine=db.engine)}\n")
    elif args.db_command == "downgrade":
        with open_database(settings, check_schema=False) as db:
            migrate.downgrade(url, args.revision)
            out.write(f"database at revision {migrate.current(url, engine=db.engine) or 'base'}\n")
    else:
        with open_database(settings, check_schema=False) as db:
            out.write(f"{migrate.current(url, engine=db.engine) or 'base (empty database)'}\n")
    return 0
