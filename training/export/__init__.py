"""Export: a calibrated checkpoint made ready for bundling (``python -m training.export``, in
``checkpoint``), and the v5 abnormality head written beside the bundled weights (``abnormal``)."""
