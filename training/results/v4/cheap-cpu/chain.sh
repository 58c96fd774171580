#!/usr/bin/env bash
# v4 protocol, cheap full-training configuration (v3's cheap one: 200 films per source x class, 128 px,
# 3 epochs, cosine, batch 32, patience 3), one CPU thread, hold-outs in the protocol's order; resumable:
# run it again and finished hold-outs are kept, an unfinished one continues from its last.pt.
# Needs runs/v4/merged.csv (training/results/v4/README.md has the build command).
# RECIPES="v4 v2 v3" (default v4) picks the recipes, run one after the other per hold-out.
cd "$(git rev-parse --show-toplevel)" || exit 1
PY=${PY:-/work/main/.venv/bin/python}
LUNG='lung_crop={"margin": 0.1, "segmenter_sha256": "3ee8067753781bdd9d5c775e9778273e5403e7183cd1b0316f5f948c55bac156"}'
CFG=(--max-per-source-class 200 --train-arg=--input-size=128 --train-arg=--epochs=3 --train-arg=--schedule=cosine
     --train-arg=--batch-size=32 --train-arg=--patience=3 --train-arg=--threads=1
     --train-arg=--cache-dir=runs/v4/cache --n-boot 500 --resume)
RES=training/results/v4/cheap-cpu
for h in ${HOLDOUTS:-shenzhen openist nih ieee8023 hannover}; do
  for r in ${RECIPES:-v4}; do
    case $r in
      v4) ARGS=(--train-arg=--augment=v4 --train-arg=--balance=source,class --train-arg=--critical=COVID,Tuberculosis
                "--train-arg=--preprocess=$LUNG") ;;
      v3) ARGS=(--labels "COVID,Normal,Viral Pneumonia,Other pneumonia" --train-source covid19-radiography
                --train-source hannover --train-source nih --train-source ieee8023
                --train-arg=--augment=v3 --train-arg=--balance=source,class "--train-arg=--preprocess=$LUNG") ;;
      v2) ARGS=(--train-source covid19-radiography --train-arg=--augment=v2 --train-arg=--balance=none) ;;
    esac
    OUT=runs/v4/cheap-cpu/lso-$r-recipe
    OMP_NUM_THREADS=1 "$PY" -m training.lso run --manifest runs/v4/merged.csv --out "$OUT" --holdout "$h" \
      "${CFG[@]}" "${ARGS[@]}" || exit 1
    mkdir -p "$RES/lso-$r-recipe"
    cp "$OUT/$h/predictions.csv" "$RES/lso-$r-recipe/$h-predictions.csv"
    cp "$OUT/$h/fold.json" "$RES/lso-$r-recipe/$h-fold.json" 2>/dev/null
    cp "$OUT/$h/run/history.json" "$RES/lso-$r-recipe/$h-history.json" 2>/dev/null
    OMP_NUM_THREADS=1 "$PY" -m training.lso report --splits train,val --n-boot 500 --out "$RES/lso-$r-recipe" \
      --predictions "$RES"/lso-$r-recipe/*-predictions.csv
  done
done
