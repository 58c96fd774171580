"""Evaluate and leave-source-out: a checkpoint's test metrics (``python -m training.evaluate``, in
``checkpoint``), leave-source-out folds and reports (``lso``), the frozen-feature studies (``frozen``),
the v5 abnormality study (``abnormal``), the out-of-domain gate and its probes (``ood``, ``probes``),
Grad-CAM in the lungs (``explain``) and the metrics they share (``metrics``)."""
