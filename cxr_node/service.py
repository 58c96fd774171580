"""Lifecycle of ``cxr-node serve``: check the database, recover the spool, start the Storage
SCP and the scheduler, and on SIGTERM/SIGINT stop accepting associations, let in-flight ones
finish (up to ``[node] drain_seconds``), and exit 0."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from cxr_node import __version__, audit
from cxr_node.audit_backlog import AuditBacklog
from cxr_node.config import Settings
from cxr_node.db.session import Database
from cxr_node.errors import NetworkError
from cxr_node.outbox import Outbox
from cxr_node.pipeline import Processor
from cxr_node.ingest import Ingest
from cxr_node.receive import Receiver
from cxr_node.scheduler import build_scheduler
from cxr_node.spool import Spool

log = logging.getLogger(__name__)


def _in_flight(receiver: Receiver) -> list:
    """Established associations (the receiver's only). A bare TCP connection that never sent an A-ASSOCIATE-RQ (a port
    probe, a health check) has nothing in flight and is not waited for."""
    return [a for a in receiver.ae.active_associations if a.is_established]


def serve(settings: Settings) -> int:
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame) -> None:  # noqa: ANN001
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    os.umask(0o077)  # spool, outbox, database: owner-only, whatever the caller's umask
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.database.url)
    db.require_current_schema()
    db.restrict_permissions()
    # temp files per node: nodes sharing one data_dir (and database) never sweep each other's
    node_id = f"{socket.gethostname()}-{settings.node.port}"
    incoming = settings.storage.incoming_dir / node_id
    spool = Spool(settings.storage.spool_dir, incoming)
    partial = spool.prepare()
    outbox = Outbox(settings, db, incoming / "outbox")
    partial += outbox.prepare()
    metrics = None
    if settings.metrics.port:
        from cxr_node.metrics import Metrics

        metrics = Metrics(db)
    backlog = AuditBacklog(settings.storage.data_dir / "audit-backlog" / f"{node_id}.jsonl")
    ingest = Ingest(db, spool, backlog)
    if partial:
        with db.transaction() as s:
            for p in partial:
                audit.record(s, "spool.partial_removed", "warning", reason="interrupted write", detail={"file": p.name})
        log.warning("removed %d partial temp file(s) left by an interrupted write", len(partial))
    recovered = ingest.recover()

    receiver = Receiver(settings, ingest, metrics)
    n = settings.node
    try:
        server = receiver.start()
    except OSError as e:
        raise NetworkError(f"cannot listen on {n.host}:{n.port}: {e.strerror} "
                           "(is another process using the port? set [node] port)") from e
    outbox.metrics = metrics
    processor = Processor(settings, db, outbox, node_id, metrics)
    processor.requeue_interrupted()
    scheduler = build_scheduler(settings, db, processor, outbox, backlog)
    scheduler.start()
    if metrics is not None:
        metrics.serve(settings.metrics.port)
    with db.transaction() as s:
        audit.record(s, "node.started", called_aet=n.ae_title, host=n.host, port=n.port,
                     detail={"version": __version__, "recovered": recovered, "partial_removed": len(partial)})
    log.info("cxr-node %s listening as %s on %s:%d (data_dir %s)", __version__, n.ae_title, n.host, n.port,
             settings.storage.data_dir)

    stop.wait()
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
    with db.transaction() as s:
        audit.record(s, "node.stopped", reason=received[0] if received else None,
                     detail={"aborted_associations": len(left)})
    db.dispose()
    log.info("stopped%s", f" ({len(left)} association(s) aborted after drain_seconds)" if left else "")
    return 0
