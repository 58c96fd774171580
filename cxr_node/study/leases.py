"""Nodes' leases on the shared database: no study dies with its node (issue 27).

Every ``cxr-node serve`` has a row in ``nodes`` (host, port, pid, when it started, its last
heartbeat) and renews it every ``[fleet] heartbeat_seconds``. What a node holds is what carries its
id: studies in ``processing`` with ``claimed_by`` = the node, and pending outbox items with
``claimed_by`` = the node (set while it sends them). One renewal renews all of it. A node whose
heartbeat is older than its ``lease_seconds``, or that stopped, or that has no row, holds nothing
any more: the next heartbeat of any other node takes its studies back to ``queued`` (audited as
``study.queued`` then ``study.requeued`` with ``detail.node`` = the dead node's id) and its outbox
items back to unclaimed (``outbox.requeued``). The interrupted attempt counts: a study claimed
``[study] max_attempts`` times fails instead, an item tried ``[outbox] max_attempts`` times is
dead-lettered, so a study that kills every node it lands on cannot go round the fleet for ever.

Time is the database's (PostgreSQL ``now()``), so the nodes' clocks need not agree; with SQLite (one
host) it is the local clock.

A node that was only slow (its heartbeat late past the lease) may finish a study another node has
taken over meanwhile: :func:`still_holds` fences it (its results are dropped, the taker's count),
and the outbox never records a send for an item another node holds. Result UIDs are deterministic,
so a study processed twice still gives the PACS one SR and one SC per film.

The spool must be one for all nodes (NFS or a shared volume, docs/fleet.md): the node that takes a
study over reads the films another node received. Each node writes a marker file
(``data_dir/fleet/<node>.<token>.marker``) named in its row; with PostgreSQL a node refuses to
start when a live node's marker is not in its own data_dir (:class:`DataDirNotShared`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import NodeRow, OutboxItem, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import CxrNodeError, db_error_text
from cxr_node.study import states

log = logging.getLogger(__name__)

LIVE, EXPIRED, STOPPED, UNKNOWN = "live", "expired", "stopped", "unknown"
MARKERS = "fleet"  # under data_dir
PENDING, DEAD = "pending", "dead"  # outbox states (cxr_node.outbox.queue)


class DataDirNotShared(CxrNodeError):
    """With PostgreSQL, this node's data_dir is provably not the one the other live nodes use."""


def node_id_of(settings: Settings) -> str:
    """The node's id: host name and DICOM port (the lock file and temp directories use it too)."""
    return f"{socket.gethostname()}-{settings.node.port}"


def db_now(session: Session) -> dt.datetime:
    """The database's clock (one clock for the fleet); the local one for SQLite (one host)."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))
    return utcnow()


def state_of(row: NodeRow, now: dt.datetime) -> str:
    if row.stopped_at is not None:
        return STOPPED
    return LIVE if (now - row.heartbeat_at).total_seconds() <= row.lease_seconds else EXPIRED


def live_nodes(session: Session, now: dt.datetime) -> dict[str, NodeRow]:
    return {r.node_id: r for r in session.scalars(select(NodeRow)) if state_of(r, now) == LIVE}


def still_holds(study: Study | None, version: int, node_id: str) -> bool:
    """Whether ``node_id`` may record its results for ``version`` of ``study``: the study is still
    processing under its claim, or has moved on to a later version (a late film reopened it: those
    results are kept, as before leases). False when another node took it over."""
    if study is None or study.version != version:
        return True
    return study.state == states.PROCESSING and study.claimed_by == node_id


# ----------------------------------------------------------------------------- joining the fleet


def _marker_ok(data_dir: Path, row: NodeRow) -> bool:
    try:
        return (data_dir / row.marker).read_text().strip() == row.token
    except OSError:
        return False


def _write_marker(data_dir: Path, node_id: str, token: str) -> str:
    d = data_dir / MARKERS
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    rel = f"{MARKERS}/{node_id}.{token[:12]}.marker"
    fd = os.open(data_dir / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return rel


def _not_shared(session: Session, data_dir: Path, node_id: str, now: dt.datetime) -> list[str]:
    """What proves that ``data_dir`` is not the other live nodes' data_dir (empty: nothing does)."""
    out = []
    for other in live_nodes(session, now).values():
        if _marker_ok(data_dir, other):
            continue
        age = (now - other.heartbeat_at).total_seconds()
        who = ("this node's id is live on another machine" if other.node_id == node_id
               else f"node {other.node_id}")
        out.append(f"{who} (pid {other.pid}, heartbeat {age:.0f} s ago, its data_dir {other.data_dir}) wrote "
                   f"{other.marker}, which is not in {data_dir}")
    return out


def register(settings: Settings, db: Database, node_id: str, version: str) -> NodeRow:
    """Join the fleet at start-up: write this node's marker, check (PostgreSQL) that every live node's
    marker is in this data_dir, then write this node's row with a fresh lease, and put back the
    outbox items a previous run of this node was sending when it died. Raises DataDirNotShared,
    audited as ``node.refused``, when the data_dir is provably not shared."""
    data_dir = settings.storage.data_dir
    token = secrets.token_hex(16)
    rel = _write_marker(data_dir, node_id, token)
    check = db.engine.dialect.name != "sqlite"
    for attempt in (1, 2):  # a node starting at the same moment may not have written its marker yet
        with db.transaction() as s:
            now = db_now(s)
            problems = _not_shared(s, data_dir, node_id, now) if check else []
            if not problems:
                row, old = _write_row(s, settings, node_id, version, rel, token, now)
                break
            if attempt == 2:
                why = (f"data_dir {data_dir} is not shared with the other nodes on this database: "
                       + "; ".join(problems) + ". Every node on one database must see the same data_dir (NFS "
                       "or a shared volume, docs/fleet.md): the node that takes over a study reads the films "
                       "another node received. Mount the shared data_dir here, or give this node a database of "
                       "its own")
                audit.record(s, "node.refused", "failure", called_aet=settings.node.ae_title,
                             port=settings.node.port, reason=why, detail={"node": node_id, "data_dir": str(data_dir)})
        if attempt == 2:  # the audit row is committed; the marker goes
            (data_dir / rel).unlink(missing_ok=True)
            raise DataDirNotShared(why)
        time.sleep(1.0)
    if old and old != rel:  # the marker of this node's previous run
        (data_dir / old).unlink(missing_ok=True)
    return row


def _write_row(s: Session, settings: Settings, node_id: str, version: str, marker: str, token: str,
               now: dt.datetime) -> tuple[NodeRow, str | None]:
    """This node's row with a fresh lease, and the marker of its previous run (to remove)."""
    row = s.get(NodeRow, node_id, with_for_update=True)
    if row is None:
        row = NodeRow(node_id=node_id)
        s.add(row)
    old = row.marker
    row.host, row.port, row.pid = socket.gethostname(), settings.node.port, os.getpid()
    row.ae_title, row.version, row.data_dir = settings.node.ae_title, version, str(settings.storage.data_dir)
    row.marker, row.token, row.lease_seconds = marker, token, settings.fleet.lease_seconds
    row.started_at = row.heartbeat_at = now
    row.stopped_at = None
    _release_outbox(s, {node_id}, node_id, settings.outbox.max_attempts, now,
                    why="this node was sending it when it stopped; tried again after its restart")
    return row, old


def stopped(db: Database, node_id: str, data_dir: Path) -> None:
    """A clean stop: the row says so (it holds nothing now) and the marker goes."""
    with db.transaction() as s:
        row = s.get(NodeRow, node_id, with_for_update=True)
        if row is None:
            return
        row.stopped_at = db_now(s)
        marker = row.marker
    (data_dir / marker).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the lease


def renew(db: Database, node_id: str) -> float | None:
    """Renew this node's lease; returns how long it had gone unrenewed (s), None if the row was gone
    (it is written again)."""
    with db.transaction() as s:
        row = s.get(NodeRow, node_id, with_for_update=True)
        now = db_now(s)
        if row is None:
            return None
        gap = (now - row.heartbeat_at).total_seconds()
        row.heartbeat_at = now
        return gap


def take_over(db: Database, node_id: str, study_max_attempts: int, outbox_max_attempts: int) -> tuple[int, int]:
    """Take back what nodes whose lease is over still hold: their studies in processing go back to
    queued (or fail, at ``study_max_attempts`` claims), their outbox items to unclaimed (or dead, at
    ``outbox_max_attempts`` tries). Returns (studies, items) taken over. Cheap when there is nothing
    to take: one read of the nodes and of what is held."""
    with db.session() as s:
        now = db_now(s)
        live = set(live_nodes(s, now)) | {node_id}
        holders = set(s.scalars(select(Study.claimed_by).where(
            Study.state == states.PROCESSING, Study.claimed_by.is_not(None)).distinct()))
        holders |= set(s.scalars(select(OutboxItem.claimed_by).where(
            OutboxItem.state == PENDING, OutboxItem.claimed_by.is_not(None)).distinct()))
    dead = holders - live
    if not dead:
        return 0, 0
    with db.transaction() as s:
        now = db_now(s)
        dead -= set(live_nodes(s, now))  # one may have come back meanwhile
        rows = {r.node_id: r for r in s.scalars(select(NodeRow).where(NodeRow.node_id.in_(dead)))}
        why = {n: _why(rows.get(n), now) for n in dead}
        n_studies = _requeue_studies(s, dead, node_id, study_max_attempts, why)
        n_items = sum(_release_outbox(s, {d}, node_id, outbox_max_attempts, now, why=why[d]) for d in dead)
    if n_studies or n_items:
        log.warning("took over %d stud(ies) and %d outbox item(s) from %s: %s", n_studies, n_items,
                    ", ".join(sorted(dead)), "; ".join(why[d] for d in sorted(dead)))
    return n_studies, n_items


def _why(row: NodeRow | None, now: dt.datetime) -> str:
    if row is None:
        return "its node has no lease (no row in nodes)"
    if row.stopped_at is not None:
        return f"node {row.node_id} stopped at {row.stopped_at.isoformat(timespec='seconds')}"
    age = (now - row.heartbeat_at).total_seconds()
    return f"node {row.node_id}'s lease expired (last heartbeat {age:.1f} s ago, lease {row.lease_seconds:g} s)"


def _locked(s: Session, q):
    return q if s.get_bind().dialect.name == "sqlite" else q.with_for_update(skip_locked=True)


def _requeue_studies(s: Session, dead: set[str], me: str, max_attempts: int, why: dict[str, str]) -> int:
    n = 0
    for st in s.scalars(_locked(s, select(Study).where(Study.state == states.PROCESSING,
                                                       Study.claimed_by.in_(dead)))):
        holder, attempt = st.claimed_by, st.attempts or 0
        detail = {"node": holder, "by": me, "attempt": attempt, "max_attempts": max_attempts}
        if attempt >= max_attempts:
            reason = (f"taken over from {holder} ({why[holder]}) after {attempt} attempt(s); not retried again: "
                      "`cxr-node reprocess` queues it once the cause is fixed")
            st.last_error, st.retry_at = reason, None
            states.move(s, st, states.FAILED, reason=reason, final=True, **detail)
        else:
            reason = f"taken over from {holder}: {why[holder]}; queued again by {me}"
            states.move(s, st, states.QUEUED, reason=reason, **detail)
            audit.record(s, "study.requeued", study_uid=st.study_uid, patient_id=st.patient_id, reason=reason,
                         detail={"version": st.version, **detail})
        n += 1
    return n


def _release_outbox(s: Session, holders: set[str], me: str, max_attempts: int, now: dt.datetime, why: str) -> int:
    """Unclaim the pending outbox items of ``holders``: the interrupted send counts as an attempt."""
    n = 0
    for row in s.scalars(_locked(s, select(OutboxItem).where(OutboxItem.state == PENDING,
                                                             OutboxItem.claimed_by.in_(holders)))):
        holder = row.claimed_by
        row.claimed_by, row.attempts = None, (row.attempts or 0) + 1
        fields = dict(study_uid=row.study_uid, sop_instance_uid=row.sop_instance_uid, sop_class_uid=row.sop_class_uid)
        detail = {"destination": row.destination, "id": row.id, "node": holder, "by": me, "attempt": row.attempts}
        if row.attempts >= max_attempts:
            row.state = DEAD
            row.last_error = f"gave up after {row.attempts} attempts; the last was interrupted: {why}"
            audit.record(s, "outbox.dead", "failure", reason=row.last_error, detail=detail, **fields)
        else:
            row.next_attempt_at = now
            audit.record(s, "outbox.requeued", reason=f"taken over from {holder}: {why}", detail=detail, **fields)
        n += 1
    return n


# ----------------------------------------------------------------------------- what status shows


def fleet(session: Session) -> list[dict]:
    """Every node with its state, last heartbeat and what it holds; holders without a row too."""
    now = db_now(session)
    studies = dict(session.execute(select(Study.claimed_by, func.count()).where(
        Study.state == states.PROCESSING, Study.claimed_by.is_not(None)).group_by(Study.claimed_by)).all())
    items = dict(session.execute(select(OutboxItem.claimed_by, func.count()).where(
        OutboxItem.state == PENDING, OutboxItem.claimed_by.is_not(None)).group_by(OutboxItem.claimed_by)).all())
    out = []
    for r in session.scalars(select(NodeRow).order_by(NodeRow.node_id)):
        out.append({"node": r.node_id, "host": r.host, "port": r.port, "pid": r.pid, "state": state_of(r, now),
                    "started": r.started_at.isoformat(timespec="seconds"),
                    "heartbeat": r.heartbeat_at.isoformat(timespec="seconds"),
                    "heartbeat_age_seconds": round((now - r.heartbeat_at).total_seconds(), 1),
                    "lease_seconds": r.lease_seconds, "data_dir": r.data_dir,
                    "studies": studies.get(r.node_id, 0), "outbox": items.get(r.node_id, 0)})
    known = {n["node"] for n in out}
    for holder in sorted((set(studies) | set(items)) - known):
        out.append({"node": holder, "host": None, "port": None, "pid": None, "state": UNKNOWN, "started": None,
                    "heartbeat": None, "heartbeat_age_seconds": None, "lease_seconds": None, "data_dir": None,
                    "studies": studies.get(holder, 0), "outbox": items.get(holder, 0)})
    return out


# ----------------------------------------------------------------------------- the heartbeat thread


class Heartbeat:
    """Renews this node's lease every ``[fleet] heartbeat_seconds`` and takes over what expired
    nodes hold, in a thread of its own (not a scheduler job: it must go on while the scheduler
    drains at shutdown). A database outage is one ERROR, its end one WARNING."""

    def __init__(self, settings: Settings, db: Database, node_id: str, metrics=None) -> None:
        self.settings, self.db, self.node_id, self.metrics = settings, db, node_id, metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cxr-node-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.fleet.heartbeat_seconds):
            self.beat()

    def beat(self) -> tuple[int, int]:
        f = self.settings.fleet
        try:
            gap = renew(self.db, self.node_id)
            if gap is None:
                log.warning("this node's row in nodes was gone; it will be written again at the next start "
                            "(until then other nodes take over what it holds)")
            elif gap > f.lease_seconds:
                log.warning("this node's lease went %.1f s without renewal (lease %g s): other nodes may have "
                            "taken over its studies; results of those are dropped here", gap, f.lease_seconds)
            taken = take_over(self.db, self.node_id, self.settings.study.max_attempts,
                              self.settings.outbox.max_attempts)
        except SQLAlchemyError as e:
            self.failures += 1
            if self.failures == 1:
                log.error("heartbeat failed on the database: %s (retrying every %g s; logged again when it "
                          "recovers)", db_error_text(e), f.heartbeat_seconds)
            return 0, 0
        if self.failures:
            log.warning("heartbeat: database reachable again after %d failed run(s)", self.failures)
            self.failures = 0
        if self.metrics is not None:
            self.metrics.takeovers.labels("study").inc(taken[0])
            self.metrics.takeovers.labels("outbox").inc(taken[1])
        return taken
