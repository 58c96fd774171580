"""APScheduler jobs (3.x API). Jobs read and write the database only, so a restart loses nothing."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from sqlalchemy.exc import SQLAlchemyError

from cxr_node.config import Settings
from cxr_node.db.session import Database
from cxr_node.errors import db_error_text
from cxr_node.node import memory
from cxr_node.study import states as studies

log = logging.getLogger(__name__)


class _Guard:
    """Runs a job body and turns database errors into one log line per outage, not one per tick: the
    first failure is an ERROR, repeats are DEBUG, and the first success after it a WARNING."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def __call__(self, body) -> None:
        try:
            body()
        except SQLAlchemyError as e:  # next tick tries again; the state is in the database
            self.failures += 1
            if self.failures == 1:
                log.error("%s failed on the database: %s (retrying every tick; logged again when it recovers)",
                          self.what, db_error_text(e))
            else:
                log.debug("%s failed again (%d): %s", self.what, self.failures, db_error_text(e))
            return
        if self.failures:
            log.warning("%s: database reachable again after %d failed run(s)", self.what, self.failures)
            self.failures = 0


def poll_interval(quiet_seconds: float) -> float:
    """How often to look for quiet studies: a fifth of the quiet period, within 0.2-5 s."""
    return max(0.2, min(5.0, quiet_seconds / 5))


def build_scheduler(settings: Settings, db: Database, processor=None, outbox=None,
                    backlog=None) -> BackgroundScheduler:
    """Jobs: complete quiet studies -> process queued studies -> drain the outbox, each handing off
    to the next at once (``wake``), with its poll as the fallback; plus the audit-backlog replay and
    retention.

    The returned scheduler also carries ``association_released(association_id)``, the receiver's
    hook: it runs the release rule (:func:`studies.complete_released`) once
    ``[study] release_grace_seconds`` have passed, as a one-off job, and wakes the worker; and
    ``reconfigure(settings)`` (a configuration reload: quiet period, release rule, retries)."""
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    current = [settings]  # replaced by reconfigure(); every job reads current[0]
    now = dt.datetime.now(dt.timezone.utc)
    running: dict[str, bool] = {}
    again: dict[str, bool] = {}

    def add(job_id: str, what: str, body, **interval) -> None:
        """One interval job: ``body`` under a database guard, run again at once if it was woken
        while running (APScheduler would skip a second instance)."""
        guard = _Guard(what)

        def run() -> None:
            running[job_id] = True
            try:
                while True:
                    again[job_id] = False
                    guard(body)
                    if not again[job_id]:
                        break
            finally:
                running[job_id] = False

        sched.add_job(run, "interval", id=job_id, max_instances=1, coalesce=True, next_run_time=now, **interval)

    def wake(job_id: str) -> None:
        """Hand-off: run the next stage now instead of at its next poll."""
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

    def complete_studies() -> None:
        done = studies.complete_quiet_studies(db, current[0].study.quiet_seconds)
        retried = studies.retry_failed(db)  # failed attempts whose backoff has run out
        if done or retried:
            wake("process-studies")

    add("complete-studies", "study completion check", complete_studies,
        seconds=poll_interval(settings.study.quiet_seconds))

    release_guard = _Guard("release completion check")

    def check_release(association_id: str, released_at: dt.datetime, grace: float) -> None:
        done: list[str] = []

        def body() -> None:
            done.extend(studies.complete_released(db, association_id, released_at, grace))

        release_guard(body)  # on a database error the quiet period completes the study instead
        if done:
            wake("process-studies")

    def association_released(association_id: str) -> None:
        """From the association's thread, once it is released: check its studies after the grace."""
        st = current[0].study
        if not st.complete_on_release or sched.state != STATE_RUNNING:
            return
        released_at = dt.datetime.now(dt.timezone.utc)
        try:
            sched.add_job(check_release, "date", args=(association_id, released_at, st.release_grace_seconds),
                          run_date=released_at + dt.timedelta(seconds=st.release_grace_seconds),
                          misfire_grace_time=None, name=f"release-{association_id}")
        except RuntimeError as e:  # the scheduler is shutting down: the quiet period (after restart) applies
            log.debug("release of %s not scheduled: %s", association_id, e)

    def reconfigure(new: Settings) -> None:
        old = current[0]
        current[0] = new
        if new.study.quiet_seconds != old.study.quiet_seconds:
            sched.reschedule_job("complete-studies", trigger="interval",
                                 seconds=poll_interval(new.study.quiet_seconds))

    sched.association_released = association_released
    sched.reconfigure = reconfigure
    if processor is not None:
        def process_studies() -> None:
            worked = False
            while processor.process_queued(limit=current[0].model.batch_size):  # one round each
                worked = True
                wake("drain-outbox")  # send each round's results while the next round is analysed
                if sched.state != STATE_RUNNING:  # stopping: what is held waits in the queue, not here
                    processor.release_held("the node stopped before finishing it; queued again")
                    break
            if worked:
                memory.release_free_memory()  # freed pages back to the system (cxr_node.node.memory)

        add("process-studies", "study processing", process_studies, seconds=0.5)
    if outbox is not None:
        add("drain-outbox", "outbox drain", outbox.drain, seconds=settings.outbox.poll_seconds)
    if backlog is not None:
        add("audit-backlog", "audit backlog replay", lambda: backlog.replay(db), seconds=2)
    if settings.retention.enabled:
        from cxr_node.ops.retention import run_retention

        add("retention", "retention job", lambda: run_retention(current[0], db), hours=1)
    return sched
