"""FHIR R4 urgent notifications: a transaction Bundle of one DiagnosticReport and its Observations,
POSTed to a FHIR base URL (the server applies the transaction) or to a webhook (which takes the
Bundle as JSON).

Built with fhir.resources' R4B models (4.3.0: DiagnosticReport, Observation and Bundle are those
of R4 4.0.1; the package ships no separate 4.0.1 set), validated by pydantic before anything is
written. The resources are updated in place by a later version (conditional PUT on their
identifiers), the report's status "corrected" then. No patient name is sent: the subject is the
patient ID as a logical reference.

    DiagnosticReport  status final/corrected, category RAD, LOINC 18748-4, subject, identifier
                      (the study UID), issued, conclusion (one sentence + NOT FOR DIAGNOSTIC USE),
                      result -> the Observations
    Observation 1     SCT 260870009 Priority = request-priority stat/asap/routine (never below
                      upstream's), with the node's own call as SCT Urgent/Routine in a component
    Observation 2..   per analysed film, each output above its operating point, as a percentage
"""

from __future__ import annotations

import json
import uuid

from cxr_node.config.channels import Notification
from cxr_node.dicom.status import PERMANENT, SENT, TRANSIENT, SendOutcome
from cxr_node.model.triggers import FHIR_PRIORITY
from cxr_node.outbox.http import TransportError, body_text, request

SCT, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
OBSERVATION_ID = "urn:cxr-node:observation"
CALL = {"urgent": ("103391001", "Urgent"), "review": ("50811001", "Routine"), "routine": ("50811001", "Routine")}


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts))}"


def build(info: dict, control_id: str, correction: bool) -> str:
    """The Bundle as JSON text."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    status = "corrected" if correction else "final"
    uid = info["study_uid"]
    subject = {"identifier": {"value": info["patient_id"] or "unknown"}, "type": "Patient"}
    code, meaning = CALL.get(info["call"] or "routine", CALL["routine"])
    obs = [Observation(
        status=status, identifier=[{"system": OBSERVATION_ID, "value": f"{uid}/priority"}],
        category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                               "code": "imaging"}]}],
        code={"coding": [{"system": SCT, "code": "260870009", "display": "Priority"}]}, subject=subject,
        valueCodeableConcept={"coding": [{"system": "http://hl7.org/fhir/request-priority",
                                          "code": FHIR_PRIORITY[info["priority"]]}]},
        component=[{"code": {"text": "cxr-node call"},
                    "valueCodeableConcept": {"coding": [{"system": SCT, "code": code, "display": meaning}]}}],
        note=[{"text": info["summary"]}], effectiveDateTime=info["iso_time"])]
    for film in info["outputs"]:
        for name, p, op in film["above"]:
            obs.append(Observation(
                status=status, identifier=[{"system": OBSERVATION_ID, "value": f"{uid}/{film['sop_uid']}/{name}"}],
                code={"text": f"{name} (cxr-node AI triage probability)"}, subject=subject,
                valueQuantity={"value": round(100 * p, 1), "unit": "%", "system": UCUM, "code": "%"},
                referenceRange=[{"high": {"value": round(100 * op, 1), "unit": "%", "system": UCUM, "code": "%"},
                                 "text": "operating point"}],
                note=[{"text": "NOT FOR DIAGNOSTIC USE"}], effectiveDateTime=info["iso_time"]))
    urls = [_urn(uid, "observation", str(i)) for i in range(len(obs))]
    idents = [{"system": DICOM_UID, "value": f"urn:oid:{uid}"}]
    if info["accession"]:
        idents.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                            "code": "ACSN"}]}, "value": info["accession"]})
    report = DiagnosticReport(
        status=status, identifier=idents,
        category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        code={"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
              "text": "cxr-node chest X-ray AI triage estimate"},
        subject=subject, issued=info["iso_time"], effectiveDateTime=info["iso_time"],
        result=[{"reference": u} for u in urls], conclusion=info["summary"])
    entries = [{"fullUrl": _urn(uid, "report"), "resource": report,
                "request": {"method": "PUT", "url": f"DiagnosticReport?identifier={DICOM_UID}|urn:oid:{uid}"}}]
    for u, o in zip(urls, obs):  # a later version updates the same resources
        entries.append({"fullUrl": u, "resource": o, "request": {
            "method": "PUT", "url": f"Observation?identifier={OBSERVATION_ID}|{o.identifier[0].value}"}})
    bundle = Bundle(id=control_id, type="transaction", entry=entries)
    return bundle.model_dump_json(exclude_none=True)


def send(n: Notification, body: bytes) -> SendOutcome:
    """POST the Bundle; 2xx sent, 408/429/5xx and no answer retried, any other 4xx a dead letter."""
    from cxr_node.errors import ConfigError

    try:
        r = request(n, "POST", n.url, body=body,
                    headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    except TransportError as e:
        return SendOutcome(TRANSIENT, None, str(e))
    except ConfigError as e:
        return SendOutcome(PERMANENT, None, str(e))
    if 200 <= r.status < 300:
        return SendOutcome(SENT, r.status, f"HTTP {r.status}")
    text = _outcome_text(r.body) or body_text(r)
    if r.status in (408, 429) or r.status >= 500:
        return SendOutcome(TRANSIENT, r.status, f"HTTP {r.status} from {n.where}" + (f": {text}" if text else ""))
    return SendOutcome(PERMANENT, r.status, f"HTTP {r.status} from {n.where}" + (f": {text}" if text else ""))


def _outcome_text(body: bytes) -> str:
    """An OperationOutcome's first diagnostics or details text, if the answer is one."""
    try:
        data = json.loads(body)
        issue = (data.get("issue") or [{}])[0] if data.get("resourceType") == "OperationOutcome" else {}
    except (ValueError, AttributeError):
        return ""
    from cxr_node.logs import redact_quoted

    text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
    return redact_quoted(" ".join(str(text).split()))[:200]
