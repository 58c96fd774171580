"""The model: checkpoint (hash + metadata), preprocess (the one MONAI chain), lungs, infer, policy (operating points), calibration."""
