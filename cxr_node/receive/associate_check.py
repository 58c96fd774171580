"""The receiver's own check of an A-ASSOCIATE-RQ, field by field, before pynetdicom sees it (issue 30).

pynetdicom rejects some requests itself, below the layer the node's handlers see: a Protocol
Version other than 1 gets an A-ASSOCIATE-RJ from its state machine, after which the association's
thread waits ``acse_timeout`` for an indication that never comes, holding a slot (16 such requests
locked every sender out for 29.8 s, unaudited). Others fail its decoder (an AE title of spaces, an
unknown item type, an even presentation context ID) and get the generic A-ABORT.

:func:`check_associate_rq` walks the request (PS3.8 9.3.2 and Annex D of PS3.7) in the
connection's own thread, where no slot is held yet, and returns the precise answer for the first
fault it finds:

=====================================================  =============================================
fault                                                  answer (PS3.8 9.3.4 / 9.3.8)
=====================================================  =============================================
fewer bytes than the fixed fields                      A-ABORT, provider, invalid parameter value (6)
Protocol Version without bit 0 (version 1)             A-ASSOCIATE-RJ 1 / 2 / 2 (protocol version)
Called AE Title empty, control character, backslash,   A-ASSOCIATE-RJ 1 / 1 / 7 (called AE title)
  not ASCII
Calling AE Title: the same                             A-ASSOCIATE-RJ 1 / 1 / 3 (calling AE title)
Application Context Name not the DICOM one             A-ASSOCIATE-RJ 1 / 1 / 2 (application context)
an item or sub-item running past its parent's end      A-ABORT, invalid parameter value (6)
an item or sub-item type PS3.8 does not define         A-ABORT, unrecognized PDU parameter (4)
an item out of place, missing or repeated              A-ABORT, unexpected PDU parameter (5) / (6)
presentation context ID not odd, a UID not ASCII       A-ABORT, invalid parameter value (6)
=====================================================  =============================================

A Protocol Version with bit 0 set and other bits too is version 1 (PS3.8 9.3.2: a receiver
"shall only test that bit 0 is set"); pynetdicom would reject it, so the request it sees says 1.
"""

from __future__ import annotations

from dataclasses import dataclass

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_FIXED = 68  # bytes of fixed fields after the PDU header (PS3.8 table 9-11: bytes 7-74)
_ITEMS = {0x10: "Application Context", 0x20: "Presentation Context", 0x50: "User Information"}
_PC_SUBITEMS = {0x30: "Abstract Syntax", 0x40: "Transfer Syntax"}
_USER_SUBITEMS = {0x51: "Maximum Length", 0x52: "Implementation Class UID", 0x53: "Asynchronous Operations Window",
                  0x54: "SCP/SCU Role Selection", 0x55: "Implementation Version Name",
                  0x56: "SOP Class Extended Negotiation", 0x57: "SOP Class Common Extended Negotiation",
                  0x58: "User Identity"}
#: fixed lengths of the user information sub-items that have one
_USER_LENGTHS = {0x51: 4, 0x53: 4}

# A-ABORT reasons, source 2 (service provider), PS3.8 9.3.8
ABORT_UNRECOGNIZED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNIZED_PARAMETER = 4
ABORT_UNEXPECTED_PARAMETER = 5
ABORT_INVALID_PARAMETER = 6
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
RJ_PROTOCOL_VERSION = (1, 2, 2)
RJ_APPLICATION_CONTEXT = (1, 1, 2)
RJ_CALLING_AET = (1, 1, 3)
RJ_CALLED_AET = (1, 1, 7)


def a_abort(reason: int) -> bytes:
    """A-ABORT PDU from the service provider (source 2) with ``reason``."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason])


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])


@dataclass(frozen=True)
class Answer:
    """What the peer is told (a whole PDU) and why, for the log and the audit trail."""

    pdu: bytes
    reason: str

class _Fault(Exception):
    def __init__(self, pdu: bytes, reason: str) -> None:
        super().__init__(reason)
        self.answer = Answer(pdu, reason)


def _abort(reason: int, text: str) -> _Fault:
    return _Fault(a_abort(reason), text)


def _reject(rsd: tuple[int, int, int], text: str) -> _Fault:
    return _Fault(a_associate_rj(*rsd), text)


def first_byte_answer(first: int) -> Answer:
    """A connection whose first PDU is not an A-ASSOCIATE-RQ (PS3.8 state Sta2: A-ABORT)."""
    if 0x02 <= first <= 0x07:
        return Answer(a_abort(ABORT_UNEXPECTED_PDU), f"a PDU of type 0x{first:02X} before any A-ASSOCIATE-RQ")
    return Answer(a_abort(ABORT_UNRECOGNIZED_PDU),
                  f"not DICOM: the first byte 0x{first:02X} does not start an A-ASSOCIATE-RQ")


def check_associate_rq(pdu: bytes) -> tuple[bytes, Answer | None]:
    """The request to hand on (its Protocol Version made 1 when bit 0 is set) and None, or the
    answer for its first fault."""
    try:
        return _check(pdu), None
    except _Fault as f:
        return pdu, f.answer


def _ae_fault(raw: bytes) -> str | None:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return "is not ASCII (PS3.5 AE: the default character repertoire)"
    if any(c < " " or c == "\\" or c == "\x7f" for c in text):
        return f"{text.strip(' ')!r} has a control character or a backslash"  # repr: escaped in the log
    if not text.strip(" "):
        return "is all spaces"
    return None


def _uid(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        raise _abort(ABORT_INVALID_PARAMETER, f"{what} is not ASCII") from None


def _walk(data: bytes, start: int, end: int, where: str):
    """(type, body start, body end) of each item in ``data[start:end]``."""
    i = start
    while i < end:
        if end - i < 4:
            raise _abort(ABORT_INVALID_PARAMETER, f"{where}: {end - i} bytes left at byte {i}, too few for an item")
        t, n = data[i], int.from_bytes(data[i + 2:i + 4], "big")
        if i + 4 + n > end:
            raise _abort(ABORT_INVALID_PARAMETER,
                         f"{where}: item 0x{t:02X} at byte {i} has length {n}, {i + 4 + n - end} bytes past its end")
        yield t, i + 4, i + 4 + n
        i += 4 + n


def _check(pdu: bytes) -> bytes:
    if len(pdu) < 6 + _FIXED:
        raise _abort(ABORT_INVALID_PARAMETER,
                     f"A-ASSOCIATE-RQ of {len(pdu) - 6} bytes is shorter than its {_FIXED} bytes of fixed fields")
    version = int.from_bytes(pdu[6:8], "big")
    if not version & 1:
        raise _reject(RJ_PROTOCOL_VERSION, f"protocol version 0x{version:04X} is not supported (bit 0, version 1, "
                      "is not set)")
    for name, raw, rsd in (("called", pdu[10:26], RJ_CALLED_AET), ("calling", pdu[26:42], RJ_CALLING_AET)):
        why = _ae_fault(raw)
        if why:
            raise _reject(rsd, f"{name} AE title {why}")
    order: list[int] = []
    for t, a, b in _walk(pdu, 6 + _FIXED, len(pdu), "A-ASSOCIATE-RQ"):
        if t not in _ITEMS:
            raise _abort(ABORT_UNRECOGNIZED_PARAMETER, f"item type 0x{t:02X} is not an A-ASSOCIATE-RQ item")
        if (t == 0x10 and order) or (t == 0x20 and order[-1:] not in ([0x10], [0x20])) or \
                (t == 0x50 and 0x50 in order) or (order and order[-1] == 0x50):
            raise _abort(ABORT_UNEXPECTED_PARAMETER, f"{_ITEMS[t]} item out of place (after "
                         f"{', '.join(_ITEMS[x] for x in dict.fromkeys(order)) or 'nothing'})")
        order.append(t)
        if t == 0x10:
            name = _uid(pdu[a:b], "Application Context Name")
            if name != DICOM_APPLICATION_CONTEXT:
                raise _reject(RJ_APPLICATION_CONTEXT, f"application context name {name[:64]!r} is not "
                              f"{DICOM_APPLICATION_CONTEXT} (DICOM)")
        elif t == 0x20:
            _check_context(pdu, a, b)
        else:
            _check_user(pdu, a, b)
    for t in (0x10, 0x50):
        if t not in order:
            raise _abort(ABORT_INVALID_PARAMETER, f"no {_ITEMS[t]} item")
    if version != 1:
        pdu = pdu[:6] + b"\x00\x01" + pdu[8:]
    return pdu


def _check_context(pdu: bytes, a: int, b: int) -> None:
    if b - a < 4:
        raise _abort(ABORT_INVALID_PARAMETER, f"Presentation Context item of {b - a} bytes (at least 4)")
    cid = pdu[a]
    where = f"presentation context {cid}"
    if not cid % 2:
        raise _abort(ABORT_INVALID_PARAMETER, f"{where}: the ID is not odd (PS3.8 9.3.2.2)")
    kinds: list[int] = []
    for t, x, y in _walk(pdu, a + 4, b, where):
        if t not in _PC_SUBITEMS:
            raise _abort(ABORT_UNRECOGNIZED_PARAMETER, f"{where}: sub-item type 0x{t:02X} is not defined")
        if (t == 0x30 and kinds) or (t == 0x40 and not kinds):
            raise _abort(ABORT_UNEXPECTED_PARAMETER, f"{where}: {_PC_SUBITEMS[t]} sub-item out of place")
        kinds.append(t)
        _uid(pdu[x:y], f"{where}: {_PC_SUBITEMS[t]}")
    if 0x40 not in kinds:
        raise _abort(ABORT_INVALID_PARAMETER, f"{where}: no Abstract Syntax and Transfer Syntax sub-items")


def _check_user(pdu: bytes, a: int, b: int) -> None:
    seen: set[int] = set()
    for t, x, y in _walk(pdu, a, b, "User Information"):
        if t not in _USER_SUBITEMS:
            raise _abort(ABORT_UNRECOGNIZED_PARAMETER, f"User Information: sub-item type 0x{t:02X} is not defined")
        if t in seen and t not in (0x54, 0x56, 0x57):
            raise _abort(ABORT_UNEXPECTED_PARAMETER, f"User Information: a second {_USER_SUBITEMS[t]} sub-item")
        seen.add(t)
        want = _USER_LENGTHS.get(t)
        if want is not None and y - x != want:
            raise _abort(ABORT_INVALID_PARAMETER,
                         f"User Information: {_USER_SUBITEMS[t]} sub-item of {y - x} bytes ({want} expected)")
        if t == 0x52:
            _uid(pdu[x:y], "Implementation Class UID")
