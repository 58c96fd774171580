"""DICOMweb: STOW-RS for the outbox, QIDO-RS for ``echo --to`` (PS3.18 10.5 and 10.6).

One POST ``{url}/studies`` per batch (multipart/related; type="application/dicom", the Part 10
files as they are on disk). The answer is mapped per instance, as PS3.18 10.5.3 defines it:

========================  =======================================================================
200 OK                    every instance stored (a WarningReason, 0008,1196, is noted: still sent)
202 Accepted              some stored: those named in FailedSOPSequence (0008,1198) get their own
                          FailureReason (0008,1197), classified like a C-STORE status (0xA7xx out of
                          resources: retry; 0xA9xx, 0xCxxx, 0x0122...: dead letter); the others are sent
409 Conflict              none stored: per FailedSOPSequence item as above, else dead letter
408, 429                  retry (the server asks for it later)
other 4xx                 dead letter with the status and the server's text (401/403: credentials,
                          404: the url, 413: too large, 415: media type)
5xx, timeouts, no answer  retry with backoff
========================  =======================================================================
"""

from __future__ import annotations

import json
import uuid
from typing import Sequence

from cxr_node.config.channels import Destination
from cxr_node.dicom.status import PERMANENT, SENT, TRANSIENT, SendOutcome, classify
from cxr_node.errors import NetworkError
from cxr_node.outbox.http import Response, TransportError, body_text, request

FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
FAILURE_REASON, WARNING_REASON, REFERENCED_SOP_INSTANCE = "00081197", "00081196", "00081155"
#: what a 4xx status means to an integration engineer
HTTP_MEANING = {400: "bad request", 401: "not authenticated (check auth and the secret)",
                403: "forbidden (check the account's rights)", 404: "not found (check url: the DICOMweb root)",
                405: "method not allowed (is url the DICOMweb root?)", 409: "conflict",
                413: "request too large", 415: "unsupported media type"}
RETRY_4XX = {408, 429}
BATCH = 16  # files per STOW-RS request


def multipart(files: Sequence[bytes]) -> tuple[bytes, str]:
    """The body and its Content-Type for a STOW-RS request of Part 10 files."""
    boundary = f"cxr-node-{uuid.uuid4().hex}"
    parts = []
    for data in files:
        parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _value(item: dict, tag: str):
    v = (item.get(tag) or {}).get("Value") or []
    return v[0] if v else None


def _by_instance(body: dict, tag: str) -> dict[str, dict]:
    return {str(_value(i, REFERENCED_SOP_INSTANCE)): i
            for i in ((body.get(tag) or {}).get("Value") or []) if _value(i, REFERENCED_SOP_INSTANCE)}


def _json(r: Response) -> dict:
    try:
        data = json.loads(r.body or b"{}")
    except ValueError:
        return {}
    if isinstance(data, list):  # some servers answer the response dataset inside a list
        data = data[0] if data and isinstance(data[0], dict) else {}
    return data if isinstance(data, dict) else {}


def outcomes(r: Response, uids: Sequence[str], where: str) -> list[SendOutcome]:
    """One outcome per instance (in ``uids`` order) from a STOW-RS answer."""
    status = r.status
    if status in (200, 202, 409):
        body = _json(r)
        failed, stored = _by_instance(body, FAILED_SOP_SEQUENCE), _by_instance(body, REFERENCED_SOP_SEQUENCE)
        out = []
        for uid in uids:
            if uid in failed:
                code = _value(failed[uid], FAILURE_REASON)
                if isinstance(code, int):
                    oc = classify(code)
                    kind = oc.kind if oc.kind != SENT else TRANSIENT  # "failed" with a success code: odd, retry
                    out.append(SendOutcome(kind, status, f"HTTP {status} from {where}: FailedSOPSequence names it, "
                                           f"FailureReason {oc.reason}"))
                else:
                    out.append(SendOutcome(PERMANENT, status, f"HTTP {status} from {where}: FailedSOPSequence names "
                                           "it without a FailureReason"))
            elif status == 409:
                out.append(SendOutcome(PERMANENT, status, f"HTTP 409 conflict from {where}: nothing stored "
                                       f"({body_text(r) or 'no reason given'})"))
            else:
                warn = _value(stored.get(uid, {}), WARNING_REASON)
                note = f" with WarningReason 0x{warn:04X}" if isinstance(warn, int) else ""
                out.append(SendOutcome(SENT, status, f"HTTP {status}: stored{note}"))
        return out
    if 400 <= status < 500:
        meaning = HTTP_MEANING.get(status, "client error")
        text = body_text(r)
        kind = TRANSIENT if status in RETRY_4XX else PERMANENT
        return [SendOutcome(kind, status, f"HTTP {status} {meaning} from {where}" + (f": {text}" if text else ""))] \
            * len(uids)
    if status >= 500:
        return [SendOutcome(TRANSIENT, status, f"HTTP {status} server error from {where}"
                            + (f": {body_text(r)}" if r.body else ""))] * len(uids)
    return [SendOutcome(TRANSIENT, status, f"HTTP {status} unexpected answer from {where}")] * len(uids)


def store(dest: Destination, files: Sequence[tuple[str, bytes]]) -> list[SendOutcome]:
    """STOW-RS ``files`` ((SOP Instance UID, Part 10 bytes) each) in batches; one outcome per file.
    Never raises for network trouble (a transient outcome) or missing credentials (permanent)."""
    from cxr_node.errors import ConfigError

    out: list[SendOutcome] = []
    for i in range(0, len(files), BATCH):
        batch = files[i:i + BATCH]
        body, ctype = multipart([b for _, b in batch])
        try:
            r = request(dest, "POST", f"{dest.url}/studies", body=body,
                        headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
        except TransportError as e:
            out += [SendOutcome(TRANSIENT, None, str(e))] * len(batch)
            continue
        except ConfigError as e:
            out += [SendOutcome(PERMANENT, None, str(e))] * len(batch)
            continue
        out += outcomes(r, [u for u, _ in batch], dest.where)
    return out


def echo(dest: Destination) -> str:
    """QIDO-RS ``GET {url}/studies?limit=1``: a line saying the server answers, or NetworkError."""
    try:
        r = request(dest, "GET", f"{dest.url}/studies?limit=1", headers={"Accept": "application/dicom+json"})
    except TransportError as e:
        raise NetworkError(str(e)) from None
    if r.status in (200, 204):
        return f"QIDO-RS {dest.where}/studies: HTTP {r.status} (the DICOMweb server answers)"
    meaning = HTTP_MEANING.get(r.status, "server error" if r.status >= 500 else "unexpected answer")
    raise NetworkError(f"QIDO-RS {dest.where}/studies: HTTP {r.status} {meaning}"
                       + (f": {body_text(r)}" if r.body else ""))
