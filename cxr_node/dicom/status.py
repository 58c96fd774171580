"""Every DIMSE status cxr-node sends or reads, and what each means, in one table (as pynetdicom's
``status.py``). PS3.4 Annex B.2.3 (Storage), PS3.7 Annex C (status encoding).

The receiver answers a C-STORE with one of :data:`SUCCESS`, :data:`OUT_OF_RESOURCES`,
:data:`DATASET_MISMATCH` or :data:`CANNOT_UNDERSTAND`; the sender reads a destination's answer with
:func:`classify` (stored, try again later, or never).
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS = 0x0000
#: Warnings that still mean "stored": coercion of data elements, elements discarded, not checked.
COERCED, ELEMENTS_DISCARDED, NOT_CHECKED = 0xB000, 0xB007, 0xB006
#: Refused: out of resources (0xA7xx), dataset does not match SOP class (0xA9xx), cannot understand (0xCxxx).
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: General DIMSE failures a destination may send (PS3.7 C.4): SOP class not supported, not
#: authorized, duplicate SOP instance, processing failure.
SOP_CLASS_NOT_SUPPORTED, NOT_AUTHORIZED, DUPLICATE_INSTANCE, PROCESSING_FAILURE = 0x0122, 0x0124, 0x0111, 0x0110
INVALID_SOP_INSTANCE = 0x0117

#: What each status the receiver sends means, for the conformance statement (``cxr-node
#: conformance``), the audit trail and the tests. Every failure carries an Error Comment saying why.
RECEIVER = {
    SUCCESS: "success, also for a repeated SOP Instance UID (stored once, audited as duplicate)",
    OUT_OF_RESOURCES: "out of resources: disk full, write error, database unavailable",
    DATASET_MISMATCH: "dataset does not match SOP class: the dataset's SOP Class/Instance UID differ from the "
                      "request or the presentation context",
    CANNOT_UNDERSTAND: "cannot understand: does not decode in the negotiated transfer syntax (Explicit VR data on "
                       "an Implicit VR context or the reverse, native pixels on a compressed context or the reverse), "
                       "is truncated, lacks or has malformed Study/Series/SOP UIDs, or the request's Affected SOP "
                       "Instance/Class UID is not a valid UID",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported: the request's SOP Class is not the abstract syntax of the "
                             "presentation context it came on (a CR C-STORE on the Verification context)",
}

#: The outbox's verdicts on a destination's answer.
SENT, TRANSIENT, PERMANENT = "sent", "transient", "permanent"
_STORED = {SUCCESS, COERCED, NOT_CHECKED, ELEMENTS_DISCARDED}
_REFUSED = {SOP_CLASS_NOT_SUPPORTED, NOT_AUTHORIZED, INVALID_SOP_INSTANCE, PROCESSING_FAILURE}


@dataclass(frozen=True)
class SendOutcome:
    kind: str               # sent | transient | permanent
    status: int | None      # the DIMSE status, when there was one
    reason: str


def classify(status: int) -> SendOutcome:
    """A destination's C-STORE response status -> what the outbox does with the item."""
    if status in _STORED:
        return SendOutcome(SENT, status, "stored" if status == SUCCESS else f"stored with warning 0x{status:04X}")
    if status == DUPLICATE_INSTANCE:
        # our result UIDs are derived from the source and the model, so the destination holds this very
        # object already (an earlier send arrived but its answer did not): retrying would only repeat
        return SendOutcome(SENT, status, f"0x{status:04X} the destination already holds this SOP Instance "
                                         "(duplicate); counted as sent")
    if 0xA700 <= status <= 0xA7FF:
        return SendOutcome(TRANSIENT, status, f"0x{status:04X} out of resources at the destination")
    if 0xA900 <= status <= 0xA9FF:
        return SendOutcome(PERMANENT, status, f"0x{status:04X} dataset does not match SOP class")
    if 0xC000 <= status <= 0xCFFF:
        return SendOutcome(PERMANENT, status, f"0x{status:04X} cannot understand")
    if status in _REFUSED:
        return SendOutcome(PERMANENT, status, f"0x{status:04X} refused by the destination")
    return SendOutcome(TRANSIENT, status, f"0x{status:04X} unexpected status")
