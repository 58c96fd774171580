"""The outbox's own rules, in process and fast (the real sends are in test_outbox.py): exponential
backoff with jitter for transient failures, dead-lettering on a permanent one or after
``max_attempts``, an unconfigured destination dead-lettered with the reason, and ``retry``."""

from __future__ import annotations

import datetime as dt

import pytest

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import AuditEvent, OutboxItem, utcnow
from cxr_node.db.session import Database
from cxr_node.dicom.status import PERMANENT, SENT, TRANSIENT, SendOutcome
from cxr_node.outbox.queue import DEAD, DONE, PENDING, Outbox, WrittenObject

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}


@pytest.fixture
def outbox(tmp_path):
    settings = config.parse({"storage": {"data_dir": str(tmp_path)}, "destinations": [PACS],
                             "outbox": {"retry_base_seconds": 10, "retry_max_seconds": 25, "max_attempts": 3}},
                            base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    db = Database(settings.database.url)
    box = Outbox(settings, db)
    box.prepare()
    yield box
    db.dispose()


def _queue(box: Outbox, n: int = 1) -> list[int]:
    objs = [WrittenObject(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.1.2.1", "sr",
                          f"1.2.3/1.2.3.{i}.dcm") for i in range(n)]
    with box.db.transaction() as s:
        assert box.enqueue(s, objs, "1.2.3", 1) == n
    return [row.id for row in box.list()]


def _row(box: Outbox, item_id: int) -> OutboxItem:
    return next(r for r in box.list() if r.id == item_id)


def _events(box: Outbox, event: str) -> list[AuditEvent]:
    with box.db.session() as s:
        return list(s.query(AuditEvent).filter(AuditEvent.event == event))


def test_transient_failures_back_off_then_dead_letter(outbox):
    (item,) = _queue(outbox)
    waits = []
    for attempt in (1, 2):
        before = utcnow()
        outbox._record([_row(outbox, item)], [SendOutcome(TRANSIENT, 0xA700, "out of resources")])
        row = _row(outbox, item)
        assert row.state == PENDING and row.attempts == attempt and row.last_status == 0xA700
        waits.append((row.next_attempt_at - before).total_seconds())
    assert 8 <= waits[0] <= 12.5 and 16 <= waits[1] <= 25.5  # 10 s, then doubled, with +-20% jitter
    assert [outbox.backoff(9) <= 25 * 1.2 for _ in range(20)] == [True] * 20  # capped at retry_max_seconds
    outbox._record([_row(outbox, item)], [SendOutcome(TRANSIENT, None, "no answer")])
    row = _row(outbox, item)
    assert row.state == DEAD and row.last_error == "gave up after 3 attempts: no answer"
    assert len(_events(outbox, "outbox.retry")) == 2 and len(_events(outbox, "outbox.dead")) == 1


def test_a_permanent_refusal_is_dead_at_once_and_success_is_final(outbox):
    bad, good = _queue(outbox, 2)
    outbox._record([_row(outbox, bad), _row(outbox, good)],
                   [SendOutcome(PERMANENT, 0xA900, "0xA900 dataset does not match SOP class"),
                    SendOutcome(SENT, 0x0000, "stored")])
    assert (_row(outbox, bad).state, _row(outbox, bad).attempts) == (DEAD, 1)
    assert _row(outbox, good).state == DONE and _row(outbox, good).sent_at is not None
    # a late outcome for an item no longer pending changes nothing
    outbox._record([_row(outbox, good)], [SendOutcome(TRANSIENT, None, "late")])
    assert _row(outbox, good).state == DONE and _row(outbox, good).attempts == 1


def test_an_unconfigured_destination_is_dead_lettered_with_the_reason_and_retry_requeues(outbox, tmp_path):
    (item,) = _queue(outbox)
    outbox.settings = config.parse({"storage": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)  # pacs removed
    assert outbox.drain() == 0
    row = _row(outbox, item)
    assert row.state == DEAD and row.last_error.startswith("destination 'pacs' is not in the running daemon's")
    assert "reload the daemon, then `cxr-node outbox retry`" in row.last_error  # what to do
    assert outbox.retry(all_dead=True, by="admin") == 1
    row = _row(outbox, item)
    assert (row.state, row.attempts) == (PENDING, 0) and row.next_attempt_at <= utcnow() + dt.timedelta(seconds=1)
    (ev,) = _events(outbox, "outbox.requeued")
    assert ev.detail["user"] == "admin"
