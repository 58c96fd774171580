"""Model training, calibration and evaluation for cxr-node (imports preprocessing from cxr_node)."""
