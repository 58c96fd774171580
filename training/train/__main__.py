"""``python -m training.train``: see the package's docstring."""

import sys

from training.train.cli import main

sys.exit(main())
