"""``python -m training.export``: a checkpoint for bundling (:mod:`training.export.checkpoint`)."""

import sys

from training.export.checkpoint import main

sys.exit(main())
