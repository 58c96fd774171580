"""DICOM objects cxr-node sends back: a Grad-CAM Secondary Capture per film (sc.py) and a
TID 1500 Structured Report per study (sr.py), built with highdicom from (source, Prediction)."""
