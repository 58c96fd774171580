"""The console's Outbox page lists the urgent notifications (HL7 v2, FHIR) and lets an admin put a
dead one back to pending (with the confirmation page first), audited with the user's name. A real
`cxr-node web` subprocess over a database seeded with notification rows."""

from __future__ import annotations

from helpers_web import Client, WebConsole, add_user, hidden, node_config

from cxr_node import config
from cxr_node.db.models import AuditEvent, Notification, utcnow
from cxr_node.db.session import Database

PASSWORD = "correct horse battery"


def test_outbox_page_lists_and_retries_notifications(tmp_path):
    cfg = node_config(tmp_path / "n")
    db = Database(config.load(cfg).database.url)
    now = utcnow()
    with db.transaction() as s:
        for state, err in (("sent", None), ("dead", "MLLP ris:2575 ACK rejected the message, MSA-1 AR (no such order)")):
            s.add(Notification(channel="ris", kind="hl7v2", study_uid="1.2.826.0.1.3680043.10.1394.9",
                               study_version=1 if state == "sent" else 2, call="urgent", priority="S",
                               correction=state == "dead", control_id="CXR1", path="x", state=state, attempts=1,
                               next_attempt_at=now, created_at=now, sent_at=now if state == "sent" else None,
                               last_error=err))
    add_user(cfg, "ada", "admin", PASSWORD)
    web = WebConsole(cfg, tmp_path / "web.log").start()
    try:
        c = Client(web.url)
        assert c.login("ada", PASSWORD).status == 303
        page = c.get("/outbox")
        assert page.status == 200, web.log[-2000:]
        text = page.text
        assert "Urgent notifications" in text and "MSA-1 AR (no such order)" in text and "urgent (correction)" in text
        assert 'name="nid" value="2"' in text and 'name="nid" value="1"' not in text  # sent ones are not retried
        token = hidden(text, "csrf_token")
        confirm = c.post("/outbox/retry", {"csrf_token": token, "nid": "2"})
        assert confirm.status == 200 and "1 notification(s)" in confirm.text
        done = c.post("/outbox/retry", {"csrf_token": token, "nid": "2", "confirm": "yes"})
        assert done.status == 303 and "1+notification" in done.headers["location"]
    finally:
        web.stop()
    with db.session() as s:
        assert s.get(Notification, 2).state == "pending"
        ev = s.query(AuditEvent).filter(AuditEvent.event == "notify.requeued").one()
        assert ev.detail["user"] == "ada" and ev.detail["id"] == 2
