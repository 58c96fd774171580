"""``python -m training.evaluate.abnormal``: see the package's docstring."""

import sys

from training.evaluate.abnormal.cli import main

sys.exit(main())
