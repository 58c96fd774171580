"""Logging set-up for the daemon and the CLI.

Log lines carry UIDs, AE titles, hosts and statuses, never patient names or other
demographics. pynetdicom's own loggers are held at WARNING: at DEBUG they dump whole PDUs and
datasets, which would put PHI in the log.
"""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(configure, "_done", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%Y-%m-%dT%H:%M:%S%z"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("pynetdicom", "apscheduler", "alembic", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "job skipped: maximum number of running instances reached" every tick while a job runs
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    configure._done = True  # type: ignore[attr-defined]
