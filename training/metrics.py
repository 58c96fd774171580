"""Classification metrics: the implementation lives in :mod:`cxr_node.model.calibration` (the node's site
calibration uses the same code); re-exported here so training code keeps importing them from
``training.metrics``."""

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
