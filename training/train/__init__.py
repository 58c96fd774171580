"""Train a chest X-ray classifier: ``python -m training.train --data DIR_OR_MANIFEST --out RUN_DIR``.

Pipeline: read the dataset (folder-per-class tree, manifest CSV, or a merged manifest from
``python -m training.data.sources build``, whose split column is used) -> grouped stratified 70/15/15
split with a fixed seed (saved as RUN_DIR/split.csv + split.json) -> preprocess every film once
with ``cxr_node.model.preprocess.base_transform`` (parameters: ``--input-size`` and ``--preprocess
KEY=VALUE``) into a uint8 cache -> train with class-weighted cross-entropy (or ``--balance``
sampling), augmentation (``--augment v2|v3``), AdamW and ReduceLROnPlateau -> early stopping on
the validation macro AUC. Writes RUN_DIR/best.pt, RUN_DIR/last.pt (with optimizer state for
``--resume``), history.json and curves.png.

On CUDA: mixed precision (autocast + GradScaler) and channels_last. Under ``torchrun`` it uses
DistributedDataParallel (nccl on CUDA, gloo on CPU) with a DistributedSampler.

After training, run ``python -m training.train.calibrate`` (temperature + operating points on the
validation split) and ``python -m training.evaluate --split test`` once.
"""
