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


def build_scheduler(settings: Settings, db: Database, processor=None, outbox=None) -> BackgroundScheduler:  # noqa: ANN001
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    quiet = settings.study.quiet_seconds

    def complete_studies() -> None:
        try:
            assembly.complete_quiet_studies(db, quiet)
        except SQLAlchemyError as e:  # next tick tries again; the state is in the database
            log.error("study completion check failed: %s", e)

    now = dt.datetime.now(dt.timezone.utc)
    sched.add_job(complete_studies, "interval", seconds=poll_interval(quiet), id="complete-studies",
                  max_instances=1, coalesce=True, next_run_time=now)

    if processor is not None:
        def process_studies() -> None:
            try:
                while processor.process_queued(limit=settings.model.batch_size):
                    pass
            except SQLAlchemyError as e:
                log.error("study processing failed on the database: %s", e)

        sched.add_job(process_studies, "interval", seconds=0.5, id="process-studies", max_instances=1,
                      coalesce=True, next_run_time=now)
    if outbox is not None:
        def drain_outbox() -> None:
            try:
                outbox.drain()
            except SQLAlchemyError as e:
                log.error("outbox drain failed on the database: %s", e)

        sched.add_job(drain_outbox, "interval", seconds=settings.outbox.poll_seconds, id="drain-outbox",
                      max_instances=1, coalesce=True, next_run_time=now)
    if settings.retention.enabled:
        from cxr_node.retention import run_retention

        def retention() -> None:
            try:
                run_retention(settings, db)
            except SQLAlchemyError as e:
                log.error("retention job failed on the database: %s", e)

        sched.add_job(retention, "interval", hours=1, id="retention", max_instances=1, coalesce=True,
                      next_run_time=now)
    return sched
