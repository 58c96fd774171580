"""``cxr-node echo --to NAME``: C-ECHO a configured destination, or a QIDO-RS probe of a DICOMweb one."""

from __future__ import annotations

import argparse
from typing import TextIO


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("echo", parents=[common], help="check a configured destination answers (C-ECHO, or "
                       "QIDO-RS for a DICOMweb one)")
    p.add_argument("--to", required=True, metavar="NAME", help="a [[destinations]] name")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.outbox.channels import echo

    ok, line = echo(settings, settings.destination(args.to), timeout=args.timeout)
    out.write(line + "\n")
    return 0 if ok else 1
