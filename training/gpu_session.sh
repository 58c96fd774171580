#!/usr/bin/env bash
# One GPU session of the v3 protocol (training/results/v3/PROTOCOL.md), from a film pack.
#
#   training/gpu_session.sh RECIPE PACK MANIFEST OUT [final]
#
# RECIPE is v2, v3 or v4 (v4: training/results/v4/PROTOCOL.md; HOLDOUTS="shenzhen openist nih ieee8023
# hannover" for its five hold-outs) (the recipes of the protocol, same configuration: 224 px, 12 epochs,
# cosine schedule, batch 32, patience 3); PACK and MANIFEST come from `python -m training.data.pack
# build ... --manifest-out`; OUT receives what comes back: the CUDA benchmark, the log, each
# fold's and the final model's weights (fp16 exports, < 16 MB each) and results.tgz (LSO reports,
# predictions, training histories and splits). With `final`, a v3 model is also trained on every
# source's train split under torchrun (DDP, one process per GPU), calibrated on the val split and
# evaluated there. Needs CUDA (DEVICE=cpu EXTRA="--epochs=1 --max-batches=2 --workers=2" is a dry run).
set -uo pipefail
RECIPE=$1 PACK=$2 MANIFEST=$3 OUT=$4 FINAL=${5:-}
WORK=${WORK:-/tmp/cxr-gpu}
mkdir -p "$WORK" "$OUT"
LUNG='lung_crop={"margin": 0.1, "segmenter_sha256": "3ee8067753781bdd9d5c775e9778273e5403e7183cd1b0316f5f948c55bac156"}'
DEVICE=${DEVICE:-cuda}
CONFIG=(--input-size=224 --epochs=12 --schedule=cosine --batch-size=32 --patience=3 --workers=12 --device=$DEVICE
        ${EXTRA:-})  # EXTRA: e.g. "--epochs=1 --max-batches=2" for a dry run on a CPU
case $RECIPE in
  v3) RECIPE_TRAIN=(--augment=v3 --balance=source,class "--preprocess=$LUNG"); LSO_ONLY=() ;;
  v4) RECIPE_TRAIN=(--augment=v4 --balance=source,class --critical=COVID,Tuberculosis "--preprocess=$LUNG")
      LSO_ONLY=() ;;
  v2) RECIPE_TRAIN=(--augment=v2 --balance=none); LSO_ONLY=(--train-source covid19-radiography) ;;
  *) echo "RECIPE must be v2, v3 or v4" >&2; exit 2 ;;
esac
pack_results() { (cd "$WORK" && tar czf "$OUT/results-$RECIPE.tgz" --exclude='*.pt' --exclude='cache' .); }
trap pack_results EXIT

TRAIN_ARGS=()
for a in "${CONFIG[@]}" "${RECIPE_TRAIN[@]}"; do TRAIN_ARGS+=("--train-arg=$a"); done
HOLDOUT_ARGS=()
for h in ${HOLDOUTS:-hannover nih ieee8023}; do HOLDOUT_ARGS+=(--holdout "$h"); done
python3 -m training.evaluate.lso run --manifest "$MANIFEST" --film-pack "$PACK" --out "$WORK/lso-$RECIPE-recipe" \
    "${HOLDOUT_ARGS[@]}" "${LSO_ONLY[@]}" "${TRAIN_ARGS[@]}"
if [ "$RECIPE" = v3 ]; then
  for h in hannover nih ieee8023; do
    ck=$WORK/lso-v3-recipe/$h/run/best.pt
    [ -f "$ck" ] && python3 -m training.export --checkpoint "$ck" --out "$OUT/fold-$h.pt" --fp16
  done
fi
pack_results

if [ "$FINAL" = final ]; then
  F=$WORK/final-v3
  torchrun --standalone --nproc_per_node 1 -m training.train --data "$MANIFEST" --film-pack "$PACK" --out "$F" \
      "${CONFIG[@]}" "${RECIPE_TRAIN[@]}" --version 3.0.0 \
    || python3 -m training.train --data "$MANIFEST" --film-pack "$PACK" --out "$F" "${CONFIG[@]}" "${RECIPE_TRAIN[@]}" \
      --version 3.0.0
  python3 -m training.train.calibrate --checkpoint "$F/best.pt" --data "$MANIFEST" --film-pack "$PACK" --split val \
      --device "$DEVICE" > "$F/calibration.json"
  python3 -m training.evaluate --checkpoint "$F/best.pt" --data "$MANIFEST" --film-pack "$PACK" --split val \
      --device "$DEVICE" --out "$F/eval-val"
  python3 -m training.export --checkpoint "$F/best.pt" --out "$OUT/final-v3.pt" --fp16
fi
