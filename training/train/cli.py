"""``python -m training.train``'s arguments and entry point (the package's docstring says what it does)."""

from __future__ import annotations

import argparse
import logging
import textwrap
from typing import Sequence

from training.train.loop import train
from training.train.sampling import DEFAULT_CRITICAL

log = logging.getLogger("training.train")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description=textwrap.fill(
            "Train a chest X-ray classifier (MONAI DenseNet121 by default) on a folder-per-class tree or a "
            "manifest CSV: grouped stratified 70/15/15 split saved next to the checkpoints, films "
            "preprocessed once into a uint8 cache with cxr_node.model.preprocess, class-weighted cross-entropy, "
            "augmentation, AdamW + ReduceLROnPlateau, early stopping on the validation macro AUC. CUDA: "
            "mixed precision + channels_last. Works under torchrun (DDP).", 88),
        epilog="""examples:
  # the bundled model (CPU, about 10-15 min per epoch on 2 cores)
  python -m training.train --data /path/covid19-radiography/manifest.csv --out runs/densenet128 \\
      --input-size 128 --epochs 6 --threads 2
  # continue an interrupted run from RUN_DIR/last.pt
  python -m training.train --data ... --out runs/densenet128 --resume
  # GPU, mixed precision, 2 GPUs
  torchrun --nproc_per_node 2 -m training.train --data ... --out runs/gpu --device cuda --input-size 224

then: python -m training.train.calibrate --checkpoint RUN_DIR/best.pt --data ...
      python -m training.evaluate --checkpoint RUN_DIR/best.pt --data ... --split test --out RUN_DIR/test
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder-per-class directory, or a manifest CSV (path,label,...)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, split, history, curves")
    p.add_argument("--arch", default="densenet121",
                   choices=["densenet121", "resnet50", "efficientnet-b0", "efficientnet-b3"])
    p.add_argument("--input-size", type=int, default=224, help="model input side in px (default 224)")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=4, help="early stopping: epochs without val macro AUC gain")
    p.add_argument("--lr-patience", type=int, default=1, help="ReduceLROnPlateau patience (epochs)")
    p.add_argument("--seed", type=int, default=42, help="split, init, shuffling and augmentation seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); under CPU contention also set "
                   "OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--cache-dir", default=None, help="where the uint8 preprocessed cache lives (default RUN_DIR/cache)")
    p.add_argument("--film-pack", default=None, metavar="FILE", help="read preprocessed films from this pack (python -m training.data.pack) instead of the source images")
    p.add_argument("--critical", action="append", default=None,
                   help=f"critical class(es) for urgent flags, each with its own operating point (repeatable or "
                   f"comma-separated, e.g. COVID,Tuberculosis; default {DEFAULT_CRITICAL} if present). A named class "
                   "that the training films lack (a leave-source-out fold) is left out with a warning")
    p.add_argument("--augment", default="v2", choices=["v2", "v3", "v4", "none"],
                   help="augmentation recipe: v2 (rotation, zoom, window jitter, contrast, noise; the bundled "
                   "v2 model's), v3 (v2's plus gamma, blur/sharpen, JPEG re-compression, resolution drop, "
                   "affine, border and text-marker occlusion: training/train/augment.py), v4 (v3's with the "
                   "down-scale-and-up-scale of every class at probability 0.5: no resolution shortcut), none")
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--balance", default="none", choices=["none", "class", "source,class"],
                   help="none (default, as v2): uniform sampling, class-weighted loss; class: sample each class "
                   "equally often, plain loss; source,class: each class equally often and, within a class, each "
                   "source equally often (needs a manifest with a source column), plain loss")
    p.add_argument("--preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cxr_node.model.preprocess parameter (VALUE is JSON, else a string), e.g. "
                   "--preprocess clahe_clip_limit=0.02; stored in the checkpoint, so serving applies it too")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (same labels, arch and input size) "
                   "with a fresh optimizer; pair it with --split-file to keep that run's split")
    p.add_argument("--split-file", default=None,
                   help="use this split.csv (e.g. an earlier run's) instead of drawing a new split, so the "
                   "test films stay the ones that run held out")
    p.add_argument("--schedule", default="plateau", choices=["plateau", "cosine"],
                   help="learning-rate schedule: ReduceLROnPlateau on val macro AUC (default), or cosine "
                   "annealing from --lr to 1%% of it over --epochs (suits fine-tuning)")
    p.add_argument("--version", dest="model_version", default=None,
                   help="model version string recorded in the checkpoint (default <arch>-<input>-<date>)")
    p.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)  # tests / smoke runs
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    train(args)
    return 0
