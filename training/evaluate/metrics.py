"""Classification metrics: the implementation lives in :mod:`cxr_node.model.calibration` (the node's site
calibration uses the same code); re-exported here so training code keeps importing them from
``training.evaluate.metrics``. Training-only statistics (the bootstrap of a mean) live here."""

from cxr_node.model.calibration import (  # noqa: F401 - re-exports
    binary_ece,
    binary_stats,
    bootstrap_auc_ci,
    bootstrap_binary_auc,
    confusion_matrix,
    expected_calibration_error,
    fit_operating_points,
    fit_temperature,
    macro_auc,
    nll,
    proportion,
    roc_auc,
    roc_curve,
    softmax,
    summarize,
    threshold_for_sensitivity,
    threshold_for_sensitivity_rule,
    threshold_max_youden,
    wilson_interval,
)


def bootstrap_mean_ci(values, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` ([nan, nan] when empty)."""
    import math

    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
