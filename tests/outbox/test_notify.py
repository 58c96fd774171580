"""Urgent notifications in process against real peers on 127.0.0.1: an MLLP listener answering
AA / AE / AR / nothing, and an HTTP server as the FHIR endpoint; when a notification is queued
(urgent, then a correction when the call changes, never twice for one call); the triggers and
the upstream priority floor. The daemon end to end is tests/e2e/test_delivery.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from helpers_peers import Answer, HTTPPeer, MLLPPeer, segments
from pydicom.dataset import Dataset

from cxr_node import config
from cxr_node.db import migrate
from cxr_node.db.models import AuditEvent, Instance
from cxr_node.db.session import Database
from cxr_node.encode.identity import ModelIdentity
from cxr_node.model import triggers
from cxr_node.model.policy import TriagePolicy
from cxr_node.outbox.notify import DEAD, DONE, PENDING, percent
from cxr_node.outbox.queue import Outbox
from cxr_node.study.work import Film, StudyWork

LABELS = ("COVID", "Normal", "Viral Pneumonia")
THRESHOLDS = {"COVID": 0.26, "Normal": 0.49, "Viral Pneumonia": 0.13}
POLICY = TriagePolicy(labels=LABELS, thresholds=THRESHOLDS, critical_labels=("COVID",), normal_label="Normal")
MODEL = ModelIdentity(name="cxr-node densenet121", version="v2", arch="densenet121", weights_sha256="0" * 64,
                      labels=LABELS, thresholds=THRESHOLDS)
NAME = "Smith^Joan"


@dataclass(frozen=True)
class Pred:
    probabilities: tuple
    labels: tuple = LABELS
    abnormal: float | None = None

    @property
    def top_label(self):
        return max(zip(self.probabilities, self.labels))[1]


def study(version: int, probs, dimse_priority=None, requested=None, trig=()) -> StudyWork:
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PID-7", NAME, "19600101", "F"
    ds.AccessionNumber, ds.StudyInstanceUID = "ACC123", "1.2.826.0.1.3680043.10.1394.77"
    if requested:
        ds.RequestedProcedurePriority = requested
    inst = Instance(sop_instance_uid=f"1.2.826.0.1.3680043.10.1394.77.{version}", dimse_priority=dimse_priority)
    w = StudyWork(ds.StudyInstanceUID, version)
    w.films.append(Film(inst, ds, prediction=triggers.apply(POLICY.apply(Pred(tuple(probs))), trig, THRESHOLDS)))
    w.upstream = triggers.upstream([dimse_priority], [requested])
    return w


@pytest.fixture
def peers():
    mllp, http = MLLPPeer(), HTTPPeer([Answer(200, {"resourceType": "Bundle"}, "application/fhir+json")])
    yield mllp, http
    mllp.stop()
    http.stop()


def _box(tmp_path, mllp, http) -> Outbox:
    settings = config.parse({"storage": {"data_dir": str(tmp_path)}, "outbox": {"max_attempts": 3},
                             "notifications": [
                                 {"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": mllp.port,
                                  "receiving_application": "RIS", "timeout": 2},
                                 {"name": "fhir", "kind": "fhir", "url": http.url + "/fhir"}]}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    box = Outbox(settings, Database(settings.database.url))
    box.prepare()
    return box


def _decide(box: Outbox, w: StudyWork) -> list[str]:
    with box.db.transaction() as s:
        return box.notifier.decide(s, w, MODEL)


def test_urgent_then_correction_over_mllp_and_fhir(tmp_path, peers):
    mllp, http = peers
    box = _box(tmp_path, mllp, http)
    assert _decide(box, study(1, (0.1, 0.85, 0.05))) == []           # routine: no one is told
    assert _decide(box, study(2, (0.95, 0.03, 0.02))) == ["ris", "fhir"]  # urgent
    assert _decide(box, study(3, (0.90, 0.05, 0.05))) == []          # still urgent: not again
    box.drain()
    rows = box.notifier.list()
    assert [(r.channel, r.state, r.study_version, r.correction) for r in rows] == \
        [("ris", DONE, 2, False), ("fhir", DONE, 2, False)]
    (msg,) = mllp.received
    seg = segments(msg)
    assert seg["MSH"][0][9] == "ORU^R01^ORU_R01" and seg["MSH"][0][12] == "2.5.1" and seg["MSH"][0][5] == "RIS"
    assert seg["PID"][0][3].startswith("PID-7") and seg["PID"][0][5] == NAME and seg["OBR"][0][18] == "ACC123"
    assert seg["OBR"][0][25] == "F" and seg["TQ1"][0][9].startswith("S^")
    text = seg["OBX"][0][5]
    assert text.startswith("Urgent: chest radiograph, AI triage COVID 95%, above the operating point 26%.")
    assert "NOT FOR DIAGNOSTIC USE" in text and seg["OBX"][-1][5] == "1.2.826.0.1.3680043.10.1394.77"
    (req,) = http.received
    assert req.method == "POST" and req.path == "/fhir" and req.headers["Content-Type"] == "application/fhir+json"
    bundle = json.loads(req.body)
    report = bundle["entry"][0]["resource"]
    assert bundle["type"] == "transaction" and report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "final" and "NOT FOR DIAGNOSTIC USE" in report["conclusion"]
    assert len(report["result"]) == len(bundle["entry"]) - 1 >= 2
    prio = bundle["entry"][1]["resource"]
    assert prio["valueCodeableConcept"]["coding"][0]["code"] == "stat" and NAME not in req.body.decode()

    assert _decide(box, study(4, (0.1, 0.85, 0.05))) == ["ris", "fhir"]  # the call changed: correction
    box.drain()
    seg = segments(mllp.received[-1])
    assert seg["OBR"][0][25] == "C" and seg["OBX"][0][11] == "C" and seg["TQ1"][0][9].startswith("R^")
    assert seg["OBX"][0][5].startswith("Not urgent (routine)")
    assert json.loads(http.received[-1].body)["entry"][0]["resource"]["status"] == "corrected"
    with box.db.session() as s:
        rows = list(s.query(AuditEvent).filter(AuditEvent.event.like("notify.%")))
    assert [e.event for e in rows].count("notify.sent") == 4
    assert NAME not in json.dumps([(e.reason, e.detail) for e in rows]) and "Smith" not in json.dumps(
        [(e.reason, e.detail) for e in rows])
    from cxr_node.ops.retention import run_retention

    assert all((box.dir / r.path).is_file() for r in box.notifier.list())
    assert run_retention(box.settings, box.db, days=1e-9).results == 4  # the messages hold the patient's name
    assert not any((box.dir / r.path).exists() for r in box.notifier.list())


def test_ack_codes_and_http_answers(tmp_path, peers):
    mllp, http = peers
    box = _box(tmp_path, mllp, http)
    mllp.codes = ["AE", "AR"]
    http.answers = [Answer(503, b"down"), Answer(422, {"resourceType": "OperationOutcome",
                                                       "issue": [{"diagnostics": "DiagnosticReport.code invalid"}]},
                                                "application/fhir+json")]
    _decide(box, study(1, (0.95, 0.03, 0.02)))
    box.drain()
    ris, fh = box.notifier.list()
    assert ris.state == PENDING and "application error, MSA-1 AE" in ris.last_error       # AE: retried
    assert fh.state == PENDING and fh.last_status == 503                                  # 5xx: retried
    box.notifier.retry([ris.id, fh.id])
    box.drain()
    ris, fh = box.notifier.list()
    assert ris.state == DEAD and "rejected the message, MSA-1 AR" in ris.last_error        # AR: dead letter
    assert fh.state == DEAD and fh.last_status == 422 and "DiagnosticReport.code invalid" in fh.last_error
    mllp.codes = [None]  # closes without an ACK
    box.notifier.retry(all_dead=True)
    box.drain()
    ris = box.notifier.list()[0]
    assert ris.state == PENDING and "without an ACK" in ris.last_error
    with box.db.session() as s:
        dead = list(s.query(AuditEvent).filter(AuditEvent.event == "notify.dead"))
    assert {e.detail["channel"] for e in dead} == {"ris", "fhir"}
    from cxr_node.ops.status import collect

    errors = collect(box.settings, box.db)["last_errors"]
    assert any(e["event"] == "notify.retry" and "without an ACK" in e["reason"] for e in errors)
    mllp.codes = ["AA"]
    box.notifier.retry([ris.id])
    box.drain()
    assert box.notifier.list()[0].state == DONE
    st = collect(box.settings, box.db)
    assert not [e for e in st["last_errors"] if "MLLP" in (e["reason"] or "")]  # delivered since: not an error now
    assert st["last_errors"] and all("fhir" in e["reason"] for e in st["last_errors"])  # fhir's are still dead
    assert st["notifications"]["dead"] == 1 and st["notifications"]["sent"] == 1
    from prometheus_client import generate_latest

    from cxr_node.ops.prometheus import Metrics

    text = generate_latest(Metrics(box.db).registry).decode()
    assert 'cxr_node_notifications{channel="ris",state="sent"} 1.0' in text
    assert 'cxr_node_notifications{channel="fhir",state="dead"} 1.0' in text


def test_triggers_and_upstream_floor():
    # a trigger list without COVID: COVID above its operating point is review, not urgent
    w = study(1, (0.95, 0.03, 0.02), trig=("Viral Pneumonia",))
    assert w.call == "review" and "not a [triage] trigger" in w.films[0].prediction.reasons[0]
    w = study(1, (0.2, 0.5, 0.3), trig=("viral pneumonia",))
    assert w.call == "urgent" and "[triage] trigger" in w.films[0].prediction.reasons[0]
    # abnormal is a trigger where the prediction has it (the lead's abnormality output)
    f = POLICY.apply(Pred((0.1, 0.8, 0.1), abnormal=0.7))
    assert triggers.apply(f, ("abnormal",), {**THRESHOLDS, "abnormal": 0.4}).urgent
    assert triggers.unknown(("abnormal", "TB"), f, THRESHOLDS) == ["abnormal", "TB"]
    # never below upstream: STAT stays STAT, C-STORE HIGH gives ASAP, a routine call keeps them
    assert study(1, (0.1, 0.85, 0.05), requested="STAT").sent_priority == "S"
    assert study(1, (0.1, 0.85, 0.05), dimse_priority=1).sent_priority == "A"
    assert study(1, (0.1, 0.85, 0.05), dimse_priority=2, requested="LOW").sent_priority == "R"
    assert study(1, (0.95, 0.03, 0.02), dimse_priority=1).sent_priority == "S"
    assert [percent(x) for x in (0.87, 0.00168, 4.04e-05, 1.0)] == ["87%", "0.168%", "< 0.1%", "100%"]


def test_a_header_value_hl7_cannot_carry_is_left_out(tmp_path, peers):
    mllp, http = peers
    box = _box(tmp_path, mllp, http)
    w = study(1, (0.95, 0.03, 0.02))
    w.films[0].ds.PatientBirthDate, w.films[0].ds.PatientID = "not a date", "P|7^X"
    assert _decide(box, w) == ["ris", "fhir"]
    box.drain()
    pid = segments(mllp.received[0])["PID"][0]
    assert pid[7] == "" and pid[3] == "P 7 X^^^^MR"  # no delimiter from a header value reaches the message


def test_two_nodes_never_send_one_notification_twice(tmp_path, peers):
    """Nodes sharing the database: the one that claims a due notification first sends it; the other's
    claim of the same row (same due time) fails, and a claim whose node died is due again after a lease."""
    mllp, http = peers
    box = _box(tmp_path, mllp, http)
    assert _decide(box, study(2, (0.95, 0.03, 0.02))) == ["ris", "fhir"]
    rows = box.notifier.list()
    other = Outbox(box.settings, Database(box.settings.database.url)).notifier  # a second node
    assert box.notifier._claim(rows[0]) and not other._claim(rows[0])
    (again,) = [r for r in box.notifier.list() if r.id == rows[0].id]
    assert again.state == "pending" and again.next_attempt_at > rows[0].next_attempt_at  # due after the lease
    assert box.drain() == 1 and len(mllp.received) == 0  # only the unclaimed FHIR one went


def _mllp_box(tmp_path, port: int, **tls) -> Outbox:
    settings = config.parse({"storage": {"data_dir": str(tmp_path)}, "outbox": {"max_attempts": 3},
                             "notifications": [{"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": port,
                                                "timeout": 3, **tls}]}, base_dir=tmp_path)
    migrate.upgrade(settings.database.url)
    box = Outbox(settings, Database(settings.database.url))
    box.prepare()
    return box


def _notify_once(box: Outbox):
    _decide(box, study(1, (0.95, 0.03, 0.02)))
    box.drain()
    (row,) = box.notifier.list()
    return row


def test_mllp_over_tls_with_a_private_ca_and_a_client_certificate(tmp_path):
    """The RIS listens for MLLP over TLS and wants our client certificate: sent with the files, and
    each missing piece (our certificate, the CA, TLS itself) is retried with a reason that says which."""
    from helpers_peers import make_pki, server_context

    d = make_pki(tmp_path / "pki", ("ris", "node"))
    ris = MLLPPeer(tls=server_context(d, "ris"))
    try:
        tls = {"tls": True, "ca_certificates": str(d / "ca.pem"), "client_certificate": str(d / "node.pem"),
               "client_key": str(d / "node.key")}
        row = _notify_once(_mllp_box(tmp_path / "a", ris.port, **tls))
        assert row.state == DONE and len(ris.received) == 1 and segments(ris.received[0])["MSH"][0][9].startswith("ORU")
        # no client certificate: the listener refuses the handshake
        row = _notify_once(_mllp_box(tmp_path / "b", ris.port, tls=True, ca_certificates=str(d / "ca.pem")))
        assert row.state == PENDING and len(ris.received) == 1 and ris.refused
        assert "MLLP over TLS 127.0.0.1" in row.last_error
        # the system's CAs do not know the RIS's: its certificate is not trusted, nothing is sent
        row = _notify_once(_mllp_box(tmp_path / "c", ris.port, tls=True, client_certificate=str(d / "node.pem"),
                                     client_key=str(d / "node.key")))
        assert row.state == PENDING and len(ris.received) == 1
        assert row.last_error.startswith("MLLP over TLS 127.0.0.1") and "TLS failed" in row.last_error
        assert "certificate" in row.last_error
        # plain MLLP to a TLS listener: no ACK, retried
        row = _notify_once(_mllp_box(tmp_path / "d", ris.port))
        assert row.state == PENDING and len(ris.received) == 1
        # a CA file that is not there: said so before any connection
        row = _notify_once(_mllp_box(tmp_path / "e", ris.port, tls=True, ca_certificates=str(d / "nope.pem")))
        assert row.state == PENDING and "cannot load the TLS files" in row.last_error
    finally:
        ris.stop()


def test_mllp_certificate_keys_need_tls(tmp_path):
    with pytest.raises(config.ConfigError, match="ca_certificates.*applies to MLLP only with tls = true"):
        config.parse({"notifications": [{"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": 2575,
                                         "ca_certificates": "/etc/ssl/ris-ca.pem"}]}, base_dir=tmp_path)
