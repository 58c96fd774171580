"""``python -m training.evaluate.lso``: see the package's docstring."""

import sys

from training.evaluate.lso.cli import main

sys.exit(main())
