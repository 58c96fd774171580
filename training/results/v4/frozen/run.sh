#!/usr/bin/env bash
# v4 protocol, frozen-feature configuration: every recipe as a head on the bundled v2 model's
# features, every hold-out; the bundled model itself; TB on the grouped Shenzhen split; cross-fitted
# operating points. Needs runs/v4/merged.csv (training/results/v4/README.md) and the features:
#   python -m training.frozen extract --manifest runs/v4/merged.csv --out runs/v4/frozen/features.npz \
#       --cap covid19-radiography:train=600 --cap covid19-radiography:val=150 --degrade openist --degrade nih
cd "$(git rev-parse --show-toplevel)" || exit 1
PY=${PY:-/work/main/.venv/bin/python}
R=training/results/v4/frozen
F=(--manifest runs/v4/merged.csv --features runs/v4/frozen/features.npz)
export OMP_NUM_THREADS=1
[ -f $R/shenzhen-cv/report.json ] || "$PY" -m training.frozen shenzhen-cv "${F[@]}" --out $R/shenzhen-cv || exit 1
for r in v2-bundled v2 v3 v4; do
  "$PY" -m training.frozen lso "${F[@]}" --recipe $r --out $R/lso-$r || exit 1
  extra=()
  [ $r = v4 ] && extra=(--fit-critical "Tuberculosis=$R/shenzhen-cv/predictions.csv")
  "$PY" -m training.lso crossfit --predictions $R/lso-$r/predictions.csv --out $R/crossfit-$r \
    --target-sensitivity 0.70 --sensitivity-rule wilson "${extra[@]}" || exit 1
done
