"""``cxr-node serve``: the daemon in the foreground."""

from __future__ import annotations

import argparse
from typing import TextIO


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001 - argparse's subparsers action
    p = sub.add_parser("serve", parents=[common], help="run the DICOM receiver and the study scheduler in the foreground",
                       description="Run the Storage SCP and the study scheduler until SIGTERM/SIGINT. "
                       "On SIGTERM it stops accepting associations, finishes in-flight stores and exits 0.")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:  # noqa: ANN001 - Settings
    from cxr_node.node.service import serve

    return serve(settings)
