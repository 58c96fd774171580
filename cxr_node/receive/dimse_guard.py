"""C-STORE requests pynetdicom cannot route, answered with a status instead of an abort (issue 18,
point 4).

pynetdicom chooses the service class of a request by the request's Affected SOP Class UID, not by
the presentation context it came on: a C-STORE whose UID is malformed (``1.2.3.``) or has two
values (``1.2.3\\4``, of which pynetdicom keeps the first) finds no service class and the
association is aborted, although the conformance statement promises 0xC000. :class:`GuardedAssociation` runs
the storage service of the context for such a C-STORE, so the node's C-STORE handler answers it
(0xC000 with the reason, audited); :func:`note_command_set` records what the command set really
held, which pynetdicom's primitive no longer shows.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.multival import MultiValue
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger(__name__)

#: Attribute set on the association by note_command_set: MessageID -> why the request's Affected
#: SOP Class UID is not usable.
BAD_CLASS_ATTR = "_cxr_bad_sop_class"


def note_command_set(event: Any) -> None:
    """EVT_DIMSE_RECV handler: remember a C-STORE-RQ whose Affected SOP Class UID has more than
    one value (pynetdicom keeps the first and says so only in a warning)."""
    cs = event.message.command_set
    value = cs.get("AffectedSOPClassUID")
    if isinstance(value, MultiValue) and cs.get("CommandField") == 0x0001:
        bad = getattr(event.assoc, BAD_CLASS_ATTR, None)
        if bad is None:
            bad = {}
            setattr(event.assoc, BAD_CLASS_ATTR, bad)
        bad[cs.get("MessageID")] = f"{len(value)} values"


def bad_sop_class(assoc: Any, message_id: int) -> str | None:
    """Why the C-STORE-RQ ``message_id``'s Affected SOP Class UID was not one UID, or None."""
    bad = getattr(assoc, BAD_CLASS_ATTR, None)
    return bad.pop(message_id, None) if bad else None


#: Attribute set on a C-STORE primitive that arrived as a C-STORE-RSP (the node sent no request)
UNSOLICITED_RSP_ATTR = "_cxr_unsolicited_rsp"


class GuardedAssociation(Association):
    """pynetdicom's acceptor association (the class is swapped in when the connection's
    association is created) with one change: every C-STORE message on an accepted context runs
    the storage service, so that the node's handler answers it with a status and audits it,
    including those pynetdicom would not route (a SOP Class UID that is not a storage class, or
    empty) or would ignore and leave the peer waiting (a C-STORE-RSP, which the node never asked
    for, or a request that lacks a required field; issue 30)."""

    def _serve_request(self, msg: Any, context_id: int) -> None:
        if isinstance(msg, C_STORE) and context_id in self._accepted_cx and not self._sent_release:
            uid = str(msg.AffectedSOPClassUID or "")
            if msg.Status is not None:  # a C-STORE-RSP: answered as a request that cannot be understood
                setattr(msg, UNSOLICITED_RSP_ATTR, True)
                msg.MessageID = msg.MessageIDBeingRespondedTo if msg.MessageIDBeingRespondedTo is not None else 0
            elif msg.MessageID is None:
                msg.MessageID = 0  # the answer needs a Message ID Being Responded To
            if getattr(msg, UNSOLICITED_RSP_ATTR, False) or not msg.is_valid_request or \
                    uid_to_service_class(uid) is not StorageServiceClass:
                context = self._accepted_cx[context_id]
                self._is_paused = True
                try:
                    StorageServiceClass(self).SCP(msg, context)
                except Exception:  # as pynetdicom's own dispatch does: log it and abort
                    log.exception("C-STORE on context %d could not be served", context_id)
                    self.abort()
                finally:
                    self._is_paused = False
                return
        super()._serve_request(msg, context_id)
