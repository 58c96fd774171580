"""``python -m training.evaluate.abnormal extract|lso|decide|export|probes`` (the package's docstring)."""

from __future__ import annotations

import argparse
from typing import Sequence

from training.evaluate import abnormal as package
from training.evaluate.abnormal.decide import cmd_decide
from training.evaluate.abnormal.features import CANDIDATES, cmd_extract
from training.evaluate.abnormal.lso import cmd_lso
from training.evaluate.abnormal.probes import cmd_probes
from training.export.abnormal import cmd_export


def main(argv: Sequence[str] | None = None) -> int:
    from training.common import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(prog="python -m training.evaluate.abnormal", description=(package.__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="pooled features of three layers and the logits of the bundled model")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--cache-dir", default="runs/v5/cache")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("lso", help="candidates and v2 on every hold-out; development report and the choice")
    q.add_argument("--manifest", required=True)
    q.add_argument("--features", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--test-out", required=True, help="test-split predictions (read only by decide)")
    q.add_argument("--candidates", default=",".join(CANDIDATES), help="which, in this order")
    q.add_argument("--resume", action="store_true", help="keep the candidates already in the files")
    q.add_argument("--n-boot", type=int, default=1000)
    d = sub.add_parser("decide", help="cross-fitted operating points and the test-split criteria (once)")
    d.add_argument("--lso", required=True, help="the lso --out folder")
    d.add_argument("--test-predictions", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--v2-threshold", type=float, default=0.261, help="v2's shipped COVID threshold")
    d.add_argument("--n-boot", type=int, default=1000)
    x = sub.add_parser("export", help="the final head and gate, written beside the bundled weights")
    x.add_argument("--manifest", required=True)
    x.add_argument("--features", required=True)
    x.add_argument("--decision", required=True, help="decide's decision.json")
    x.add_argument("--out", required=True, help="the new checkpoint (NAME.pt; the gate goes to NAME.ood.pt)")
    x.add_argument("--version", default="densenet121-128-v5-abnormal")
    x.add_argument("--gate-rule", choices=["registered", "crossfit"], default="crossfit")
    b = sub.add_parser("probes", help="probe families through the serving rules under each bundled gate")
    b.add_argument("--work", default="runs/v5/probes")
    b.add_argument("--out", required=True)
    b.add_argument("--models", default="v2,v5")
    b.add_argument("--inversion-films", help="a folder of frontal PNGs to invert (inverted-film probes)")
    b.add_argument("--dicom-samples", help="folder with dx_image.dcm (the dog thorax)")
    b.add_argument("--laterals", help="folder of lateral chest views")
    b.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    {"extract": cmd_extract, "lso": cmd_lso, "decide": cmd_decide, "export": cmd_export,
     "probes": cmd_probes}[args.cmd](args)
    return 0
