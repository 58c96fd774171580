"""``cxr-node conformance``: the DICOM Conformance Statement, written from the code
(``cxr-node conformance > docs/conformance.md``)."""

from __future__ import annotations

import argparse
from typing import TextIO


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("conformance", parents=[common], help="print the DICOM Conformance Statement (Markdown)",
                       description="Print the DICOM Conformance Statement (PS3.2 layout) as Markdown, read from "
                       "the code: the accepted presentation contexts, the DIMSE statuses, the association "
                       "rules and the SC and SR the builders write. Independent of --config: it describes "
                       "the defaults. `cxr-node conformance > docs/conformance.md` updates the shipped copy.")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.dicom.conformance import statement

    out.write(statement())
    return 0
