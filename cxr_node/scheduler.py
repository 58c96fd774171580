"""APScheduler jobs (3.x API). Jobs read and write the database only, so a restart loses nothing."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from sqlalchemy.exc import SQLAlchemyError

from cxr_node import assembly
from cxr_node.config import Settings
from cxr_node.db.session import Database
from cxr_node.errors import db_error_text

log = logging.getLogger(__name__)


class _Guard:
    """Runs a job body and turns database errors into one log line per outage, not one per tick: the
    first failure is an ERROR, repeats are DEBUG, and the first success after it a WARNING."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def __call__(self, body):  # noqa: ANN001, ANN204 - returns the body's result, None on failure
        try:
            result = body()
        except SQLAlchemyError as e:  # next tick tries again; the state is in the database
            self.failures += 1
            if self.failures == 1:
                log.error("%s failed on the database: %s (retrying every tick; logged again when it recovers)",
                          self.what, db_error_text(e))
            else:
                log.debug("%s failed again (%d): %s", self.what, self.failures, db_error_text(e))
            return None
        if self.failures:
            log.warning("%s: database reachable again after %d failed run(s)", self.what, self.failures)
            self.failures = 0
        return result


def poll_interval(quiet_seconds: float) -> float:
    """How often to look for quiet studies: a fifth of the quiet period, within 0.2-5 s."""
    return max(0.2, min(5.0, quiet_seconds / 5))


def build_scheduler(settings: Settings, db: Database, processor=None, outbox=None,  # noqa: ANN001
                    backlog=None) -> BackgroundScheduler:  # noqa: ANN001
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    quiet = settings.study.quiet_seconds
    running: dict[str, bool] = {}
    again: dict[str, bool] = {}

    def wake(job_id: str) -> None:
        """Hand-off: run the next stage now instead of at its next poll. A stage that is running
        goes round once more when it finishes (APScheduler would skip a second instance). The polls
        stay as the fallback, e.g. after a restart."""
        if running.get(job_id):
            again[job_id] = True
            return
        if sched.state != STATE_RUNNING:
            return
        # Not from this (job) thread: APScheduler's shutdown(wait=True) holds the job-store lock while
        # it waits for running jobs, so a job that modifies a job during shutdown would deadlock it
        # (seen: SIGTERM while a study was being analysed never exited). A daemon thread may block
        # there harmlessly; shutdown does not wait for it.
        threading.Thread(target=_modify_now, args=(job_id,), name=f"wake-{job_id}", daemon=True).start()

    def _modify_now(job_id: str) -> None:
        try:
            sched.modify_job(job_id, next_run_time=dt.datetime.now(dt.timezone.utc))
        except JobLookupError:  # removed at shutdown
            pass

    def stage(job_id: str, body):  # noqa: ANN001, ANN202
        def run() -> None:
            running[job_id] = True
            try:
                while True:
                    again[job_id] = False
                    body()
                    if not again[job_id]:
                        break
            finally:
                running[job_id] = False
        return run


    guard_complete = _Guard("study completion check")

    def complete_studies() -> None:
        if guard_complete(lambda: assembly.complete_quiet_studies(db, quiet)):
            wake("process-studies")

    now = dt.datetime.now(dt.timezone.utc)
    sched.add_job(stage("complete-studies", complete_studies), "interval", seconds=poll_interval(quiet), id="complete-studies",
                  max_instances=1, coalesce=True, next_run_time=now)

    if processor is not None:
        guard_process = _Guard("study processing")

        def _process_all() -> int:
            total = 0
            while n := processor.process_queued(limit=settings.model.batch_size):
                total += n
                wake("drain-outbox")  # send each batch's results while the next batch is analysed
            return total

        def process_studies() -> None:
            guard_process(_process_all)

        sched.add_job(stage("process-studies", process_studies), "interval", seconds=0.5, id="process-studies", max_instances=1,
                      coalesce=True, next_run_time=now)
    if outbox is not None:
        guard_outbox = _Guard("outbox drain")

        def drain_outbox() -> None:
            guard_outbox(outbox.drain)

        sched.add_job(stage("drain-outbox", drain_outbox), "interval", seconds=settings.outbox.poll_seconds, id="drain-outbox",
                      max_instances=1, coalesce=True, next_run_time=now)
    if backlog is not None:
        guard_backlog = _Guard("audit backlog replay")

        def replay_backlog() -> None:
            guard_backlog(lambda: backlog.replay(db))

        sched.add_job(replay_backlog, "interval", seconds=2, id="audit-backlog", max_instances=1, coalesce=True,
                      next_run_time=now)
    if settings.retention.enabled:
        from cxr_node.retention import run_retention

        guard_retention = _Guard("retention job")

        def retention() -> None:
            guard_retention(lambda: run_retention(settings, db))

        sched.add_job(retention, "interval", hours=1, id="retention", max_instances=1, coalesce=True,
                      next_run_time=now)
    return sched
