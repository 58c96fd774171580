"""Audit events as DICOM Audit Messages (PS3.15 Annex A.5, the RFC 3881-based XML that ATNA
audit record repositories accept), one ``<AuditMessage>`` document per line.

Mapping (events without a DICOM audit meaning, such as internal study states, are not exported):

  node.started / node.stopped          110100 Application Activity (110120 Start / 110121 Stop)
  instance.stored / instance.failed    110104 DICOM Instances Transferred, action C, the modality
                                       as Source (110153), cxr-node as Destination (110152)
  outbox.sent / outbox.dead            110104 DICOM Instances Transferred, action R, cxr-node as
                                       Source, the PACS as Destination
  image.triaged                        110103 DICOM Instances Accessed, action R
  retention.removed                    110103 DICOM Instances Accessed, action D
  association.rejected                 110113 Security Alert (110127 Node Authentication)
  web.login / web.login_failed         110114 User Authentication (110122 Login), the user as requestor
  web.logout                           110114 User Authentication (110123 Logout)
  web.study_viewed                     110103 DICOM Instances Accessed, action R, the user as requestor:
                                       who saw which patient's study, from which address
  web.worklist_searched                110112 Query, action E, the user as requestor (the patient searched)
  web.audit_viewed                     110101 Audit Log Used, action R, the user as requestor
  user.added / user.password_changed   110113 Security Alert (110137 User Security Attributes Changed)
  / user.disabled
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Iterable, TextIO

SOURCE_ID = "cxr-node"

# event -> (EventID code, meaning, action, event type (code, meaning) or None, we are the source?)
_MAP: dict[str, tuple[str, str, str, tuple[str, str] | None, bool]] = {
    "node.started": ("110100", "Application Activity", "E", ("110120", "Application Start"), True),
    "node.stopped": ("110100", "Application Activity", "E", ("110121", "Application Stop"), True),
    "instance.stored": ("110104", "DICOM Instances Transferred", "C", None, False),
    "instance.failed": ("110104", "DICOM Instances Transferred", "C", None, False),
    "outbox.sent": ("110104", "DICOM Instances Transferred", "R", None, True),
    "outbox.dead": ("110104", "DICOM Instances Transferred", "R", None, True),
    "image.triaged": ("110103", "DICOM Instances Accessed", "R", None, True),
    "retention.removed": ("110103", "DICOM Instances Accessed", "D", None, True),
    "association.rejected": ("110113", "Security Alert", "E", ("110127", "Node Authentication"), False),
    "web.login": ("110114", "User Authentication", "E", ("110122", "Login"), False),
    "web.login_failed": ("110114", "User Authentication", "E", ("110122", "Login"), False),
    "web.logout": ("110114", "User Authentication", "E", ("110123", "Logout"), False),
    "web.study_viewed": ("110103", "DICOM Instances Accessed", "R", None, False),
    "web.worklist_searched": ("110112", "Query", "E", None, False),
    "web.audit_viewed": ("110101", "Audit Log Used", "R", None, False),
    "user.added": ("110113", "Security Alert", "E", ("110137", "User Security Attributes Changed"), False),
    "user.password_changed": ("110113", "Security Alert", "E", ("110137", "User Security Attributes Changed"),
                              False),
    "user.disabled": ("110113", "Security Alert", "E", ("110137", "User Security Attributes Changed"), False),
}
OUTCOME = {"success": "0", "warning": "4", "failure": "8"}


def _code(parent: ET.Element, tag: str, code: str, system: str, meaning: str) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def _participant(msg: ET.Element, user: str, requestor: bool, host: str | None, role: tuple[str, str]) -> None:
    attrs = {"UserID": user or "-", "UserIsRequestor": "true" if requestor else "false"}
    if host:
        attrs.update(NetworkAccessPointID=host, NetworkAccessPointTypeCode="2")
    ap = ET.SubElement(msg, "ActiveParticipant", attrs)
    _code(ap, "RoleIDCode", role[0], "DCM", role[1])


def message(row: dict[str, Any], node_aet: str) -> ET.Element | None:
    """One audit row (as from ``audit.as_dict``) -> an AuditMessage element, or None if unmapped."""
    spec = _MAP.get(row["event"])
    if spec is None:
        return None
    code, meaning, action, event_type, we_are_source = spec
    msg = ET.Element("AuditMessage")
    ev = ET.SubElement(msg, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": row["time"],
        "EventOutcomeIndicator": OUTCOME.get(row["outcome"], "8")})
    _code(ev, "EventID", code, "DCM", meaning)
    if event_type:
        _code(ev, "EventTypeCode", event_type[0], "DCM", event_type[1])
    if row.get("reason") and row["outcome"] != "success":
        ev.set("EventOutcomeDescription", str(row["reason"])[:256])

    detail = row.get("detail") or {}
    peer_aet = row.get("calling_aet") or detail.get("destination") or "-"
    source_role, dest_role = ("110153", "Source Role ID"), ("110152", "Destination Role ID")
    if row["event"].startswith(("web.", "user.")):
        # a person at the web console (or an admin at the command line) is the requestor
        who = detail.get("by") if row["event"].startswith("user.") else detail.get("user")
        attrs = {"UserID": str(who or "-"), "UserIsRequestor": "true"}
        if row.get("host"):
            attrs.update(NetworkAccessPointID=row["host"], NetworkAccessPointTypeCode="2")
        ET.SubElement(msg, "ActiveParticipant", attrs)
        _participant(msg, node_aet, False, None, ("110150", "Application"))
    elif code == "110104":
        if we_are_source:
            _participant(msg, node_aet, True, None, source_role)
            _participant(msg, detail.get("destination", "-"), False, None, dest_role)
        else:
            _participant(msg, peer_aet, True, row.get("host"), source_role)
            _participant(msg, row.get("called_aet") or node_aet, False, None, dest_role)
    elif code == "110113":
        _participant(msg, peer_aet, True, row.get("host"), ("110153", "Source Role ID"))
    else:
        _participant(msg, node_aet, False, None, ("110150", "Application"))

    ET.SubElement(msg, "AuditSourceIdentification", {"AuditSourceID": SOURCE_ID})
    if row["event"].startswith("user.") and detail.get("user"):
        # the account whose security attributes changed (RFC 3881: person, security user entity)
        ua = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(detail["user"]), "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "11"})
        _code(ua, "ParticipantObjectIDTypeCode", "11", "RFC-3881", "User Identifier")
    if row.get("study_uid"):
        po = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": row["study_uid"], "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(po, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
        desc = ET.SubElement(po, "ParticipantObjectDescription")
        if row.get("sop_class_uid"):
            ET.SubElement(desc, "SOPClass", {"UID": row["sop_class_uid"], "NumberOfInstances": "1"})
    if row.get("patient_id"):
        pp = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": row["patient_id"], "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(pp, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
    return msg


def write_messages(rows: Iterable[dict[str, Any]], node_aet: str, out: TextIO) -> tuple[int, int]:
    """Write one AuditMessage per line; return (written, skipped as having no DICOM audit meaning)."""
    written = skipped = 0
    for row in rows:
        msg = message(row, node_aet)
        if msg is None:
            skipped += 1
            continue
        out.write(ET.tostring(msg, encoding="unicode") + "\n")
        written += 1
    return written, skipped
