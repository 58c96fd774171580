"""``cxr-node user add|passwd|disable|list``: the web console's accounts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from cxr_node.cli._db import open_database
from cxr_node.errors import ConfigError


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    u = sub.add_parser("user", parents=[common], help="web console accounts: add, passwd, disable, list",
                       description="Accounts of the web console (`cxr-node web`). Roles: admin (everything, "
                       "including outbox retry and purge), radiologist (worklist, studies, feedback), viewer "
                       "(read only). Passwords are stored as argon2id hashes. A password is asked twice on a "
                       "terminal, or read as the first line of standard input otherwise "
                       "(`printf '%s\\n' \"$PW\" | cxr-node user add alice --role radiologist`). "
                       "Every change is audited (user.added, user.password_changed, user.disabled).")
    us = u.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    a = us.add_parser("add", parents=[common], help="create a user")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=["admin", "radiologist", "viewer"])
    p = us.add_parser("passwd", parents=[common], help="set a user's password (their sessions end)")
    p.add_argument("name")
    d = us.add_parser("disable", parents=[common], help="disable a user (their sessions end at once)")
    d.add_argument("name")
    ls = us.add_parser("list", parents=[common], help="list users")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    u.set_defaults(run=run)


def read_password(prompt: str = "Password") -> str:
    """Twice from the terminal, or the first line of standard input when it is not a terminal."""
    import getpass

    from cxr_node.web.users import check_password

    if sys.stdin.isatty():
        pw = getpass.getpass(f"{prompt}: ")
        if pw != getpass.getpass(f"{prompt} again: "):
            raise ConfigError("the two passwords differ; nothing changed")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
        if not pw:
            raise ConfigError("no password on standard input (give it as the first line)")
    return check_password(pw)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:  # noqa: ANN001 - Settings
    from cxr_node.web import users

    from cxr_node.cli._db import require_existing

    cmd = args.user_command
    if cmd in ("add", "passwd"):
        users.check_name(args.name)
    require_existing(settings)  # before asking for a password
    with open_database(settings) as db:
        if cmd == "add":
            users.add(db, args.name, args.role, read_password())
            out.write(f"user {args.name} added as {args.role}\n")
        elif cmd == "passwd":
            users.set_password(db, args.name, read_password("New password"))
            out.write(f"password of {args.name} changed; their sessions ended\n")
        elif cmd == "disable":
            users.disable(db, args.name)
            out.write(f"user {args.name} disabled; their sessions ended\n")
        else:
            rows = users.listing(db)
            if args.format == "json":
                json.dump(rows, out, indent=1)
                out.write("\n")
            else:
                from cxr_node.cli._table import plural, write_table

                write_table(out, ("name", "role", "disabled", "last_login"),
                            [[r["name"], r["role"], "yes" if r["disabled"] else "no", r["last_login_at"]] for r in rows],
                            f"({plural(len(rows), 'user')})")
    return 0
