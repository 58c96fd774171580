"""Model training, calibration and evaluation for cxr-node (imports preprocessing from cxr_node), a
package per stage: ``data`` (sources and splits), ``train``, ``evaluate`` (leave-source-out first),
``export``, ``onboarding`` (studies). ``python -m training`` lists the commands."""

from training.commands import install_aliases

install_aliases()
