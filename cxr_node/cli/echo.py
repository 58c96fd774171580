"""``cxr-node echo --to NAME``: C-ECHO a configured destination."""

from __future__ import annotations

import argparse
from typing import TextIO


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser("echo", parents=[common], help="C-ECHO a configured destination")
    p.add_argument("--to", required=True, metavar="NAME", help="a [[destinations]] name")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:  # noqa: ANN001 - Settings
    from cxr_node.outbox.send import echo

    dest = settings.destination(args.to)
    status = echo(settings, dest, timeout=args.timeout)
    out.write(f"C-ECHO {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{' over TLS' if dest.tls else ''}): "
              f"status 0x{status:04X} " + ("Success" if status == 0 else "failed") + "\n")
    return 0 if status == 0 else 1
