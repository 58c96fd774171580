"""Onboarding studies: what a site calibration does to the urgent flag's sensitivity at a site the model
never saw (``calibration``), and how few labels ``adapt-site`` may ask for on the abnormal axis
(``abnormal``)."""
