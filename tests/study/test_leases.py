"""Leases, in process and fast (the real three-node fleet on PostgreSQL is tests/e2e/test_fleet.py):
a node's row and marker, renewal, expiry, the takeover of a dead node's studies and outbox items
(audited with its id, the attempt counted), and the fences that keep a node whose lease lapsed from
recording over the node that took its work."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import AuditEvent, NodeRow, OutboxItem, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.dicom.status import SENT, SendOutcome
from cxr_node.ops import status
from cxr_node.outbox.queue import PENDING, Outbox, WrittenObject
from cxr_node.study import leases
from cxr_node.study import states as studies

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}


@pytest.fixture
def fleet(tmp_path):
    settings = config.parse({"storage": {"data_dir": str(tmp_path)}, "destinations": [PACS],
                             "fleet": {"heartbeat_seconds": 1, "lease_seconds": 5},
                             "study": {"max_attempts": 2}, "outbox": {"max_attempts": 3}}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    yield settings, db
    db.dispose()


def _study(db, uid: str, claimed_by: str | None, attempts: int = 1, state: str = studies.PROCESSING) -> None:
    now = utcnow()
    with db.transaction() as s:
        s.add(Study(study_uid=uid, state=state, version=1, instance_count=1, first_received_at=now,
                    last_received_at=now, state_changed_at=now, claimed_by=claimed_by, attempts=attempts))


def _item(db, sop: str, claimed_by: str | None, attempts: int = 0) -> int:
    now = utcnow()
    with db.transaction() as s:
        row = OutboxItem(destination="pacs", sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                         transfer_syntax="1.2.840.10008.1.2.1", study_uid="1.2.3", study_version=1, kind="sc",
                         path=f"1.2.3/{sop}.dcm", state=PENDING, attempts=attempts, next_attempt_at=now,
                         created_at=now, claimed_by=claimed_by)
        s.add(row)
        s.flush()
        return row.id


def _age(db, node_id: str, seconds: float) -> None:
    """Pretend ``node_id`` last renewed its lease ``seconds`` ago."""
    with db.transaction() as s:
        s.get(NodeRow, node_id).heartbeat_at = utcnow() - dt.timedelta(seconds=seconds)


def _events(db, event: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id)))


def test_a_node_registers_renews_and_expires(fleet, tmp_path):
    settings, db = fleet
    row = leases.register(settings, db, "a-1", "test")
    assert (tmp_path / row.marker).read_text().strip() == row.token  # the marker its row names
    _age(db, "a-1", 3)
    gap = leases.renew(db, "a-1")
    assert 2.5 < gap < 10
    with db.session() as s:
        (view,) = leases.fleet(s)
    assert view["state"] == leases.LIVE and view["heartbeat_age_seconds"] < 1 and view["lease_seconds"] == 5
    _age(db, "a-1", 6)  # past its lease of 5 s
    with db.session() as s:
        assert leases.fleet(s)[0]["state"] == leases.EXPIRED
    leases.stopped(db, "a-1", tmp_path)
    with db.session() as s:
        assert leases.fleet(s)[0]["state"] == leases.STOPPED
    assert not (tmp_path / row.marker).exists()
    # a second start of the same node: a new marker, the old one removed, live again
    again = leases.register(settings, db, "a-1", "test")
    assert again.marker != row.marker and sorted(p.name for p in (tmp_path / "fleet").iterdir()) == [
        again.marker.split("/")[1]]


def test_an_expired_nodes_studies_are_taken_over_and_the_attempt_counts(fleet):
    settings, db = fleet
    for n in ("dead", "live", "me"):
        leases.register(settings, db, n, "test")
    _age(db, "dead", 6)
    _study(db, "1.1", "dead", attempts=1)   # one attempt left: queued again
    _study(db, "1.2", "dead", attempts=2)   # its second claim died too: failed, not round the fleet again
    _study(db, "1.3", "live")               # a live node's: untouched
    _study(db, "1.4", "ghost")              # a holder with no row at all (a node from before leases)
    _study(db, "1.5", "dead", state=studies.PROCESSED)  # finished: nothing held
    with db.session() as s:
        view = {n["node"]: n for n in leases.fleet(s)}
    assert view["dead"]["state"] == leases.EXPIRED and view["dead"]["studies"] == 2
    assert view["ghost"]["state"] == leases.UNKNOWN and view["ghost"]["studies"] == 1
    assert "NO LEASE" in status.node_line(view["ghost"]) and "LEASE EXPIRED" in status.node_line(view["dead"])
    assert status.node_line(view["live"]).startswith("live (pid ") and ": live, heartbeat" in status.node_line(view["live"])
    assert leases.take_over(db, "me", study_max_attempts=2, outbox_max_attempts=3) == (3, 0)
    with db.session() as s:
        got = {st.study_uid: (st.state, st.claimed_by) for st in s.scalars(select(Study))}
    assert got["1.1"][0] == studies.QUEUED and got["1.4"][0] == studies.QUEUED
    assert got["1.2"][0] == studies.FAILED and got["1.3"] == (studies.PROCESSING, "live")
    assert got["1.5"][0] == studies.PROCESSED
    requeued = {e.study_uid: e for e in _events(db, "study.requeued")}
    assert set(requeued) == {"1.1", "1.4"}
    assert requeued["1.1"].detail["node"] == "dead" and requeued["1.1"].detail["by"] == "me"
    assert requeued["1.1"].detail["attempt"] == 1 and "lease expired" in requeued["1.1"].reason
    assert "no lease" in requeued["1.4"].reason
    (failed,) = [e for e in _events(db, "study.failed") if e.study_uid == "1.2"]
    assert failed.detail["node"] == "dead" and failed.detail["final"] is True and "2 attempt(s)" in failed.reason
    # the next claim is attempt 2 of study 1.1, by the node that took it over
    assert ("1.1", 1) in studies.claim(db, 8, "me")
    with db.session() as s:
        assert s.get(Study, "1.1").attempts == 2
    assert leases.take_over(db, "me", 2, 3) == (0, 0)  # nothing left to take


def test_an_expired_nodes_outbox_items_are_taken_over(fleet):
    settings, db = fleet
    for n in ("dead", "me"):
        leases.register(settings, db, n, "test")
    leases.stopped(db, "dead", settings.storage.data_dir)  # a stopped node holds nothing either
    a = _item(db, "2.1", "dead", attempts=0)
    b = _item(db, "2.2", "dead", attempts=2)  # its third try was interrupted: dead-lettered
    c = _item(db, "2.3", "me")
    assert leases.take_over(db, "me", 2, outbox_max_attempts=3) == (0, 2)
    with db.session() as s:
        rows = {r.id: r for r in s.scalars(select(OutboxItem))}
    assert rows[a].state == PENDING and rows[a].claimed_by is None and rows[a].attempts == 1
    assert rows[b].state == "dead" and "interrupted" in rows[b].last_error and "stopped" in rows[b].last_error
    assert rows[c].claimed_by == "me"
    (req,) = _events(db, "outbox.requeued")
    assert req.detail["node"] == "dead" and req.detail["id"] == a


def test_a_restarted_node_sends_again_what_it_was_sending(fleet):
    settings, db = fleet
    leases.register(settings, db, "me", "test")
    item = _item(db, "3.1", "me")
    leases.register(settings, db, "me", "test")  # the next start of the same node
    with db.session() as s:
        row = s.get(OutboxItem, item)
    assert row.claimed_by is None and row.attempts == 1 and row.state == PENDING


def test_a_node_whose_lease_lapsed_records_nothing_over_the_taker(fleet, tmp_path):
    settings, db = fleet
    # studies: the taker holds it now, or it is queued again: the slow node may not finish nor fail it
    _study(db, "4.1", "taker", attempts=2)
    with db.session() as s:
        st = s.get(Study, "4.1")
    assert not leases.still_holds(st, 1, "slow") and leases.still_holds(st, 1, "taker")
    assert leases.still_holds(st, 0, "slow")  # an older version's results (a late film reopened it) are kept
    assert studies.fail(db, "4.1", 1, "boom", max_attempts=3, node_id="slow") is None
    with db.session() as s:
        assert s.get(Study, "4.1").state == studies.PROCESSING  # the taker's claim stands
    # outbox: an item the taker claimed is not recorded as sent by the slow node
    box = Outbox(settings, db)
    box.prepare()
    box.node_id = "slow"
    item = _item(db, "4.2", "taker")
    with db.session() as s:
        row = s.get(OutboxItem, item)
    assert box._record([row], [SendOutcome(SENT, 0, None)]) == 0
    with db.session() as s:
        assert s.get(OutboxItem, item).state == PENDING
    box.node_id = "taker"
    assert box._record([row], [SendOutcome(SENT, 0, None)]) == 1
    with db.session() as s:
        got = s.get(OutboxItem, item)
    assert got.state == "sent" and got.claimed_by is None


def test_drain_claims_before_it_sends(fleet, tmp_path):
    """An item another node is sending is not picked up; an unclaimed one is claimed for this node."""
    settings, db = fleet
    box = Outbox(settings, db)
    box.prepare()
    box.node_id = "me"
    theirs = _item(db, "5.1", "other")
    mine = _item(db, "5.2", None)
    claimed = box._claim([theirs, mine])
    assert [r.id for r in claimed] == [mine] and claimed[0].claimed_by == "me"
    assert box._claim([mine]) == []  # claimed once only
    with db.transaction() as s:
        assert box.enqueue(s, [WrittenObject("5.3", "1.2", "1.2.840.10008.1.2.1", "sr", "x/5.3.dcm")],
                           "1.2.3", 1) == 1


def test_fleet_settings_are_checked():
    with pytest.raises(config.ConfigError, match=r"\[fleet\] lease_seconds: must be at least twice"):
        config.parse({"fleet": {"heartbeat_seconds": 10, "lease_seconds": 15}}, base_dir=config.BUNDLED_DIR)
