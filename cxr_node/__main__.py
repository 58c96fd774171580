"""``python -m cxr_node`` is the same as the ``cxr-node`` console script."""

import sys

from cxr_node.cli import main

sys.exit(main())
