"""APScheduler jobs (3.x API). Jobs read and write the database only, so a restart loses nothing."""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from cxr_node import assembly
from cxr_node.config import Settings
from cxr_node.db.session import Database

log = logging.getLogger(__name__)


def poll_interval(quiet_seconds: float) -> float:
    """How often to look for quiet studies: a fifth of the quiet period, within 0.2-5 s."""
    return max(0.2, min(5.0, quiet_seconds / 5))


def build_scheduler(settings: Settings, db: Database) -> BackgroundScheduler:
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    quiet = settings.study.quiet_seconds

    def complete_studies() -> None:
        try:
            assembly.complete_quiet_studies(db, quiet)
        except SQLAlchemyError as e:  # next tick tries again; the state is in the database
            log.error("study completion check failed: %s", e)

    sched.add_job(complete_studies, "interval", seconds=poll_interval(quiet), id="complete-studies",
                  max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.timezone.utc))
    return sched
