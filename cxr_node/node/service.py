"""Lifecycle of ``cxr-node serve``: lock this node's place in data_dir, listen, check the
database, recover the spool, start accepting associations and the scheduler (and load the model
in the background), and on SIGTERM/SIGINT stop accepting associations, let in-flight ones
finish (up to ``[node] drain_seconds``), and exit 0. SIGHUP reloads the configuration
(:mod:`cxr_node.node.reload`).

Nothing in data_dir is touched before the lock is held and the port is bound: a second
``serve`` started by mistake with the same configuration exits 1 naming the lock (or the port)
without sweeping the live node's temp files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from cxr_node import __version__
from cxr_node.audit import trail as audit
from cxr_node.audit.backlog import AuditBacklog
from cxr_node.config import Settings, destinations_warning, exposure_warning
from cxr_node.db.session import Database
from cxr_node.errors import CxrNodeError, NetworkError, db_error_text
from cxr_node.node import memory
from cxr_node.node.reload import Reloader, running_summary
from cxr_node.node.scheduler import build_scheduler
from cxr_node.onboarding import stations
from cxr_node.outbox.queue import Outbox
from cxr_node.receive.ingest import Ingest
from cxr_node.receive.scp import Receiver
from cxr_node.receive.spool import Spool
from cxr_node.study import leases
from cxr_node.study.pipeline import Processor

log = logging.getLogger(__name__)


def _in_flight(receiver: Receiver) -> list:
    """Established associations (the receiver's only). A bare TCP connection that never sent an A-ASSOCIATE-RQ (a port
    probe, a health check) has nothing in flight and is not waited for."""
    return [a for a in receiver.ae.active_associations if a.is_established]


class InstanceLockError(CxrNodeError):
    """Another ``cxr-node serve`` already runs as this node (same data_dir, host name and port)."""


def lock_node(data_dir: Path, node_id: str) -> int:
    """Hold ``data_dir/.lock-<node_id>`` (fcntl.flock, exclusive) for the life of the process and
    return its descriptor; raise InstanceLockError if another process holds it. Per node, not
    per data_dir: nodes on other ports or hosts may share data_dir (and the database)."""
    path = data_dir / f".lock-{node_id}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InstanceLockError(f"another cxr-node is already serving as this node (pid {holder}): {path} is locked; "
                                "stop it first, or give this one another [node] port or [storage] data_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _preload(processor: Processor, stop: threading.Event) -> None:
    try:
        processor.preload(stop)
    # torch and checkpoint loading raise many types; reported here, and the first study retries through
    # the lazy path, which records the failure on the study
    except Exception as e:
        log.error("could not load the model at start-up (%s: %s); the first study will try again", type(e).__name__, e)


def serve(settings: Settings) -> int:
    stop = threading.Event()
    wake = threading.Event()  # a signal arrived: stop, or reload (SIGHUP)
    received: list[str] = []
    reloads: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()
        wake.set()

    def on_hup(_signum: int, _frame) -> None:
        reloads.append(1)
        wake.set()

    censuses: list[int] = []

    def on_usr1(_signum: int, _frame) -> None:
        censuses.append(1)
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # until the node is up, a reload has nothing to do but must not end the process (SIGHUP's default)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_usr1)  # log a memory census (cxr_node.node.memory)

    os.umask(0o077)  # spool, outbox, database: owner-only, whatever the caller's umask
    memory.tune_allocator()  # before any thread starts (cxr_node.node.memory)
    n = settings.node
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # temp files per node: nodes sharing one data_dir (and database) never sweep each other's
    node_id = leases.node_id_of(settings)
    lock_fd = lock_node(settings.storage.data_dir, node_id)  # noqa: F841 - held until the process exits
    db = Database(settings.database.url)
    db.require_current_schema()
    incoming = settings.storage.incoming_dir / node_id
    spool = Spool(settings.storage.spool_dir, incoming)
    outbox = Outbox(settings, db, incoming / "outbox")
    metrics = None
    if settings.metrics.port:
        from cxr_node.ops.prometheus import Metrics

        metrics = Metrics(db)
    backlog = AuditBacklog(settings.storage.data_dir / "audit-backlog" / f"{node_id}.jsonl")
    ingest = Ingest(db, spool, backlog)
    receiver = Receiver(settings, ingest, metrics)
    try:
        server = receiver.bind()  # connections wait in the backlog until the spool is ready
    except OSError as e:
        raise NetworkError(f"cannot listen on {n.host}:{n.port}: {e.strerror} "
                           "(is another process using the port? set [node] port)") from e
    db.restrict_permissions()
    # the lease: PostgreSQL nodes refuse a data_dir not shared with the live ones (docs/fleet.md)
    leases.register(settings, db, node_id, __version__)
    heartbeat = leases.Heartbeat(settings, db, node_id, metrics)
    heartbeat.start()
    partial = spool.prepare()
    partial += outbox.prepare()
    if partial:
        with db.transaction() as s:
            for p in partial:
                audit.record(s, "spool.partial_removed", "warning", reason="interrupted write", detail={"file": p.name})
        log.warning("removed %d partial temp file(s) left by an interrupted write", len(partial))
    recovered = ingest.recover()
    receiver.serve()
    outbox.metrics, outbox.node_id = metrics, node_id
    processor = Processor(settings, db, outbox, node_id, metrics)
    processor.requeue_interrupted()
    stations.sync(settings, db)  # a mode changed in [[stations]] since the last start is audited here
    preloader = None
    if settings.model.preload:
        log.info("loading the model in the background; receiving already")
        preloader = threading.Thread(target=_preload, args=(processor, stop), name="cxr-node-model-preload",
                                     daemon=True)
        preloader.start()
    scheduler = build_scheduler(settings, db, processor, outbox, backlog)
    scheduler.start()
    receiver.on_released = scheduler.association_released  # the release rule of study completion
    reloader = Reloader(settings, db, receiver, outbox, processor, scheduler)
    if metrics is not None:
        metrics.serve(settings.metrics.port)
    with db.transaction() as s:
        audit.record(s, "node.started", called_aet=n.ae_title, host=n.host, port=n.port,
                     detail={"version": __version__, "recovered": recovered, "partial_removed": len(partial),
                             "running": running_summary(settings)})
    log.info("cxr-node %s listening as %s on %s:%d (data_dir %s)", __version__, n.ae_title, n.host, n.port,
             settings.storage.data_dir)
    from cxr_node.config.channels import file_warnings

    for warning in (exposure_warning(settings), destinations_warning(settings),
                    *file_warnings((*settings.destinations, *settings.notifications))):
        if warning:
            log.warning("%s", warning)

    while not stop.is_set():
        wake.wait()
        wake.clear()
        if censuses:
            censuses.clear()
            log.warning("memory census (asked for by SIGUSR1): %s", json.dumps(memory.census(), sort_keys=True))
        while reloads and not stop.is_set():
            reloads.clear()
            try:
                reloader.reload()
            except SQLAlchemyError as e:  # the new settings are applied; only the audit row is missing
                log.error("configuration reload: could not write its audit row: %s", db_error_text(e))
    settings = reloader.settings
    n = settings.node
    log.info("%s received: no new associations; finishing in-flight ones (up to %gs)",
             received[0] if received else "stop", n.drain_seconds)
    server.shutdown()  # closes the listening socket; running associations carry on
    deadline = time.monotonic() + n.drain_seconds
    while _in_flight(receiver) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _in_flight(receiver)
    for assoc in left:
        assoc.abort()
    scheduler.shutdown(wait=True)
    heartbeat.stop()  # renewed until the last batch was done; now this node holds nothing
    if preloader is not None and preloader.is_alive():
        # exiting while torch initialises in another thread can abort the interpreter
        # ("terminate called without an active exception", exit status 134)
        log.info("waiting for the model load to finish before exiting")
        preloader.join()
    leases.stopped(db, node_id, settings.storage.data_dir)
    with db.transaction() as s:
        audit.record(s, "node.stopped", reason=received[0] if received else None,
                     detail={"aborted_associations": len(left)})
    db.dispose()
    log.info("stopped%s", f" ({len(left)} association(s) aborted after drain_seconds)" if left else "")
    return 0
