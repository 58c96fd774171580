"""The v5 protocol's abnormality output (training/results/v5/PROTOCOL.md): "abnormal (any finding) vs
normal", asked within each hospital, as a logistic head on the bundled backbone's frozen features.

    # 1. every film once through the bundled model: pooled features of three layers, and its logits
    python -m training.evaluate.abnormal extract --manifest runs/v5/merged.csv --out runs/v5/features.npz
    # 2. leave-source-out: the head (per feature set) and v2 scored by 1 - p(Normal), every hold-out
    python -m training.evaluate.abnormal lso --manifest runs/v5/merged.csv --features runs/v5/features.npz \\
        --out training/results/v5/lso-trainval
    # 3. the final head on every source, written into a checkpoint beside the bundled weights
    python -m training.evaluate.abnormal export --manifest ... --features ... --out cxr_node/models/cxr-densenet121-v5.pt

The target is ``Abnormal`` = any label that is not Normal / No Finding. A head is fitted only on
sources that hold both classes (the disease labels whose positives and negatives come from other
hospitals teach the hospital), with sample weights equal per source x class, L2 chosen by the fold's
pooled validation AUC. Feature sets: ``final`` (the pooled penultimate layer, what site heads use),
``multi`` (``final`` + the pooled outputs of dense blocks 2 and 3).
"""
