#!/usr/bin/env bash
# v3 protocol, medium CPU configuration (128 px, 6 epochs), both recipes, hold-outs paired; resumable.
cd "$(git rev-parse --show-toplevel)"  # packs: python -m training.pack build (PROTOCOL.md addendum)
LUNG='lung_crop={"margin": 0.1, "segmenter_sha256": "3ee8067753781bdd9d5c775e9778273e5403e7183cd1b0316f5f948c55bac156"}'
CFG=(--train-arg=--input-size=128 --train-arg=--epochs=6 --train-arg=--schedule=cosine --train-arg=--batch-size=32
     --train-arg=--patience=3 --train-arg=--threads=2 --resume)
for h in nih ieee8023 hannover; do
  OMP_NUM_THREADS=2 nice -n 19 .venv/bin/python -m training.lso run --manifest runs/gpu/v3.csv \
    --film-pack runs/cpu/v3crop128.pack.npz --out runs/cpu/lso-v3-recipe --holdout $h "${CFG[@]}" \
    --train-arg=--augment=v3 --train-arg=--balance=source,class "--train-arg=--preprocess=$LUNG" || exit 1
  OMP_NUM_THREADS=2 nice -n 19 .venv/bin/python -m training.lso run --manifest runs/gpu/v2.csv \
    --film-pack runs/cpu/v2full128.pack.npz --out runs/cpu/lso-v2-recipe --holdout $h "${CFG[@]}" \
    --train-source covid19-radiography --train-arg=--augment=v2 --train-arg=--balance=none || exit 1
done
