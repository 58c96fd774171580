"""``python -m training``: the commands by stage, with the names they had before."""

import sys

from training.commands import listing

sys.stdout.write(listing())
