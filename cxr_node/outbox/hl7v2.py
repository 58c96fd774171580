"""HL7 v2.5.1 ORU^R01 for urgent notifications, sent over MLLP, its ACK read.

The message (built and validated by hl7apy against the 2.5.1 structure):

    MSH  sending/receiving application and facility, ORU^R01^ORU_R01, control ID, P, 2.5.1
    PID  PID-3 patient ID, PID-5 name, PID-7 birth date, PID-8 sex (from the study's films)
    ORC  RE (observations to follow)
    OBR  OBR-3 filler order number (cxr-node's), OBR-4 LOINC 18748-4 "Diagnostic imaging study",
         OBR-7 when analysed, OBR-18 accession number, OBR-25 F (final) or C (correction)
    TQ1  TQ1-9 priority (HL7 0485: S stat, A ASAP, R routine), never below upstream's
    OBX  1: the call in one sentence with NOT FOR DIAGNOSTIC USE (TX); 2: per analysed film, its
         outputs above their operating points (TX); 3: the Study Instance UID (DCM 110180, ST);
         OBX-11 F or C

The ACK: MSA-1 AA (or CA) sent; AE (or CE) application error: retried with backoff; AR (or CR)
rejected: dead letter at once; no answer, a timeout or an unreadable answer: retried.
"""

from __future__ import annotations

import re
import socket
import ssl
from typing import Any

from cxr_node.config.channels import Notification
from cxr_node.dicom.status import PERMANENT, SENT, TRANSIENT, SendOutcome

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
_DELIMS = str.maketrans({c: " " for c in "|^~\\&\r\n\t"})


def _text(v: Any, limit: int = 2000) -> str:
    """A value safe inside one HL7 field (no delimiters, one line)."""
    return " ".join(str(v or "").translate(_DELIMS).split())[:limit]


def _name(v: Any) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) -> XPN, components kept."""
    parts = str(v or "").split("=")[0].split("^")[:5]
    return "^".join(_text(p, 80) for p in parts).rstrip("^")


def build(n: Notification, info: dict, control_id: str, correction: bool) -> str:
    """The ORU^R01 message (ER7, segments ended by CR) for ``info`` (cxr_node.outbox.notify.info)."""
    from hl7apy.core import Message

    status = "C" if correction else "F"
    m = Message("ORU_R01", version="2.5.1", validation_level=2)
    m.msh.msh_3 = _text(n.sending_application, 180) or "CXRNODE"
    if n.sending_facility:
        m.msh.msh_4 = _text(n.sending_facility, 180)
    if n.receiving_application:
        m.msh.msh_5 = _text(n.receiving_application, 180)
    if n.receiving_facility:
        m.msh.msh_6 = _text(n.receiving_facility, 180)
    m.msh.msh_7 = info["time"]
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_18 = "UNICODE UTF-8"  # names may hold any character; the bytes sent are UTF-8
    pr = m.ORU_R01_PATIENT_RESULT
    pid = pr.ORU_R01_PATIENT.PID
    pid.pid_1 = "1"
    pid.pid_3 = f"{_text(info['patient_id'], 20)}^^^^MR"
    pid.pid_5 = _name(info["patient_name"]) or "UNKNOWN"
    if re.fullmatch(r"\d{8}", info["birth_date"] or ""):  # a DICOM DA that is not a date is left out
        pid.pid_7 = info["birth_date"]
    if info["sex"] in ("M", "F", "O", "U"):
        pid.pid_8 = info["sex"]
    oo = pr.ORU_R01_ORDER_OBSERVATION
    oo.ORC.orc_1 = "RE"
    oo.ORC.orc_3 = f"{info['order_id']}^CXRNODE"
    oo.OBR.obr_1 = "1"
    oo.OBR.obr_3 = f"{info['order_id']}^CXRNODE"
    oo.OBR.obr_4 = "18748-4^Diagnostic imaging study^LN"
    oo.OBR.obr_7 = info["time"]
    if info["accession"]:
        oo.OBR.obr_18 = _text(info["accession"], 16)
    oo.OBR.obr_25 = status
    tq = oo.add_group("ORU_R01_TIMING_QTY")
    tq.TQ1.tq1_1 = "1"
    tq.TQ1.tq1_9 = {"S": "S^Stat^HL70485", "A": "A^ASAP^HL70485", "R": "R^Routine^HL70485"}[info["priority"]]
    rows = [("TX", "CXRTRIAGE^cxr-node triage result^L", info["summary"])]
    rows += [("TX", "CXRFILM^cxr-node film result^L", line) for line in info["films"]]
    rows.append(("ST", "110180^Study Instance UID^DCM", info["study_uid"]))
    for i, (vt, code, value) in enumerate(rows, start=1):
        ob = oo.add_group("ORU_R01_OBSERVATION")
        ob.OBX.obx_1 = str(i)
        ob.OBX.obx_2 = vt
        ob.OBX.obx_3 = code
        ob.OBX.obx_5 = _text(value) if vt == "TX" else value
        ob.OBX.obx_11 = status
        ob.OBX.obx_14 = info["time"]
    m.validate()  # hl7apy: the 2.5.1 structure, required fields and datatypes
    return m.to_er7() + "\r"


def tls_context(n: Notification) -> ssl.SSLContext:
    """The client side of MLLP over TLS: the listener's certificate checked against ``ca_certificates``
    (else the system's CAs) and its host name or IP; ours presented when ``client_certificate`` is set."""
    ctx = ssl.create_default_context(cafile=str(n.ca_certificates) if n.ca_certificates else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if n.client_certificate is not None:
        ctx.load_cert_chain(str(n.client_certificate), str(n.client_key) if n.client_key else None)
    return ctx


def _connect(n: Notification, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((n.host, n.port), timeout=n.timeout)
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock, server_hostname=n.host)
    except BaseException:
        sock.close()
        raise


def send(n: Notification, message: bytes) -> SendOutcome:
    """One MLLP exchange (over TLS with ``tls = true``): the framed message out, the framed ACK back,
    classified."""
    where = n.where
    try:
        ctx = tls_context(n) if n.tls else None
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a file that is not PEM, a key that does not fit
        return SendOutcome(TRANSIENT, None, f"cannot load the TLS files for {where} (ca_certificates, "
                                            f"client_certificate, client_key): {getattr(e, 'strerror', None) or e}")
    try:
        with _connect(n, ctx) as sock:
            sock.settimeout(n.timeout)
            sock.sendall(SB + message + EB + CR)
            buf = b""
            while EB + CR not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return SendOutcome(TRANSIENT, None, f"{where} closed the connection without an ACK")
                buf += chunk
                if len(buf) > 1 << 20:
                    return SendOutcome(TRANSIENT, None, f"{where} sent more than 1 MiB without ending its ACK")
    except socket.timeout:
        return SendOutcome(TRANSIENT, None, f"no ACK from {where} within {n.timeout:g}s")
    except ssl.SSLError as e:  # before OSError, its base: the handshake or the certificate check failed
        why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e)
        return SendOutcome(TRANSIENT, None, f"{where}: TLS failed: {why} (check ca_certificates / "
                                            "client_certificate)")
    except OSError as e:
        return SendOutcome(TRANSIENT, None, f"cannot reach {where}: {e.strerror or e}")
    start = buf.find(SB)
    return read_ack(buf[start + 1 if start >= 0 else 0:buf.index(EB + CR)], _control_id(message), where)


def _control_id(message: bytes) -> str:
    msh = message.split(b"\r", 1)[0].decode("utf-8", "replace").split("|")
    return msh[9] if len(msh) > 9 else ""


def read_ack(raw: bytes, control_id: str, where: str) -> SendOutcome:
    """An ACK's MSA -> sent / retry / dead letter."""
    from hl7apy.parser import parse_message

    from cxr_node.logs import redact_quoted

    text = raw.decode("utf-8", "replace").replace("\n", "\r").strip("\r")
    try:
        ack = parse_message(text, validation_level=2, find_groups=False)
        msa = ack.msa
        code, acked = str(msa.msa_1.value), str(msa.msa_2.value)
        # the receiver's text, for the audit trail; an HL7 name (family^given) or a quoted value in it is withheld
        why = _text(redact_quoted(re.sub(r"\S*\^\S*", "[withheld]", str(msa.msa_3.value or ""))), 200)
    except Exception as e:  # hl7apy raises many types for a malformed message: not an ACK we can read
        return SendOutcome(TRANSIENT, None, f"{where} answered something that is not an HL7 ACK "
                           f"({type(e).__name__})")
    detail = f"MSA-1 {code}" + (f" ({why})" if why else "")
    if acked and control_id and acked != control_id:
        return SendOutcome(TRANSIENT, None, f"{where} acknowledged message {_text(acked, 30)}, not {control_id}: "
                           f"{detail}")
    if code in ("AA", "CA"):
        return SendOutcome(SENT, None, f"ACK {detail}")
    if code in ("AE", "CE"):
        return SendOutcome(TRANSIENT, None, f"{where} ACK application error, {detail}")
    if code in ("AR", "CR"):
        return SendOutcome(PERMANENT, None, f"{where} ACK rejected the message, {detail}")
    return SendOutcome(TRANSIENT, None, f"{where} ACK with unknown code, {detail}")
