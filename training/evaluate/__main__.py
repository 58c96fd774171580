"""``python -m training.evaluate``: a checkpoint on a split (:mod:`training.evaluate.checkpoint`)."""

import sys

from training.evaluate.checkpoint import main

sys.exit(main())
