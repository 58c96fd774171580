"""Leave-source-out (LSO) evaluation: how a model does on a hospital / source it never saw.

    # train one model per held-out source, predict that source, report (see --help of each)
    python -m training.evaluate.lso run --manifest runs/merged.csv --out runs/lso-v3 \\
        --holdout hannover --holdout nih --holdout ieee8023 \\
        --train-arg=--input-size=128 --train-arg=--epochs=2 --max-per-source-class 300
    # a fixed checkpoint (e.g. the bundled v2 model) on the same held-out sources, no training
    python -m training.evaluate.lso evaluate --checkpoint cxr_node/models/cxr-densenet121.pt \\
        --manifest runs/merged.csv --out training/results/v2-other-sources \\
        --holdout hannover --holdout nih --holdout ieee8023 --seen-source covid19-radiography
    # re-make the report from predictions CSVs
    python -m training.evaluate.lso report --predictions runs/lso-v3/predictions.csv --out runs/lso-v3
    # operating points chosen on leave-source-out predictions: each hold-out judged with the
    # temperature and threshold fitted on the other hold-outs' predictions
    python -m training.evaluate.lso crossfit --predictions runs/lso-v3/predictions.csv --out runs/lso-v3-crossfit \\
        --target-sensitivity 0.70 --sensitivity-rule wilson

The manifest is a merged one (``python -m training.data.sources build``). A hold-out is a source name
(``nih``: the sites that source holds most films of, from any folder), ``site:SITE`` (e.g. ``site:ieee8023/Italy``) or ``ieee8023-countries`` (every ieee8023
country with at least 10 COVID and 4 other films). For each hold-out, ``run``:

1. takes the held-out films: the kept rows of that source or site in ``--holdout-splits`` of the
   builder's split (default ``train,val``: a held-out source's test split stays closed until the
   shipping decision is made; ``--holdout-splits test`` predicts it once afterwards);
2. trains on the other kept rows of the train split (validation: their val split; their test split
   is never read), leaving out every row whose dedup group (patient, near-duplicate, cross-folder
   copy) also holds a held-out film, and every row from the held-out site(s);
   ``--train-source`` keeps only those sources (e.g. the v2 recipe: covid19-radiography only),
   ``--max-per-source-class N`` subsamples (seeded) for cheap runs;
3. fits temperature and the critical-class threshold on that validation split (calibrate's rules);
4. predicts the held-out films and writes ``HOLDOUT/predictions.csv``.

Both commands then write ``report.json`` and ``README.md`` tables. For each hold-out: COVID films
flagged urgent (sensitivity at the operating threshold), non-COVID films not called COVID (argmax)
and not flagged urgent, per label, the urgent rate on Normal films, the within-source COVID AUC;
pooled over hold-outs: the COVID-vs-rest AUC, the urgent rate on normals, the COVID urgent rate
and the calibration error of the COVID probability (binary ECE) and of the top label (films whose
label the model knows). Proportions carry Wilson 95% intervals, AUCs patient-group bootstrap 95%
intervals. The issue's goals are checked at the end.
"""
