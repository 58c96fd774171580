"""``cxr-node retention [--days N]``: run the retention job now."""

from __future__ import annotations

import argparse
from typing import TextIO

from cxr_node.cli._db import open_database


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser("retention", parents=[common], help="run the retention job now (as the daemon does hourly)",
                       description="Delete spooled films and sent result files older than [retention] days "
                       "(or --days). Nothing of a study with pending or dead-lettered results is removed.")
    p.add_argument("--days", type=float, help="override [retention] days for this run")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:  # noqa: ANN001 - Settings
    from cxr_node.ops.retention import run_retention

    with open_database(settings) as db:
        r = run_retention(settings, db, args.days)
    out.write(f"removed {r.films} film(s) and {r.results} sent result file(s); kept {r.kept_unsent} not yet done\n")
    return 0
