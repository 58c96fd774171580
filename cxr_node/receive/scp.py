"""The Storage SCP: AE, presentation contexts, allow-lists, connection limits, and the C-STORE
handler with its DIMSE status mapping.

The C-STORE handler takes the bytes exactly as received and hands them to ``ingest.py``, which
checks the UIDs and makes the instance durable (spool + database); only then does it answer
Success. It never waits on later stages: study completion is a scheduler job that reads the
database.

DIMSE statuses (PS3.4 Annex B.2.3, PS3.7 C.4.2):
  0x0000 success, also for a repeated SOP Instance UID (stored once, audited as duplicate)
  0xA700 out of resources: disk full, write error, database unavailable
  0xA900 dataset does not match SOP class: SOP Class/Instance UID differ from the request
  0xC000 cannot understand: does not decode, or not in the negotiated transfer syntax (Explicit VR
         data on an Implicit VR context, native pixels on a JPEG one: dataset_check.py), lacks or
         has malformed Study/Series/SOP UIDs
  0x0122 SOP class not supported: the request's SOP Class is not the presentation context's
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from sqlalchemy.exc import SQLAlchemyError

from cxr_node.config import Settings
from cxr_node.dicom import status as dimse
from cxr_node.dicom.uids import identify, is_valid_uid
from cxr_node.errors import InvalidInstanceError, SOPClassMismatchError, SpoolError, db_error_text
from cxr_node.logs import PerKeyRate, redact_quoted
from cxr_node.receive.association import AssociationInfo
from cxr_node.receive.dataset_check import encoding_fault
from cxr_node.receive.dimse_guard import UNSOLICITED_RSP_ATTR, bad_sop_class, note_command_set
from cxr_node.receive.guard import (
    REPORTED_ABORT_FILTER,
    ConnectionGuard,
    GuardedServer,
    LimitedSSLSocket,
    PDULimit,
    abort_when_a_thread_dies,
)
from cxr_node.receive.ingest import STATUS_SUCCESS, Header, Ingest, read_header

log = logging.getLogger(__name__)

STATUS_OUT_OF_RESOURCES = dimse.OUT_OF_RESOURCES      # the table: cxr_node.dicom.status
STATUS_SOP_CLASS_MISMATCH = dimse.DATASET_MISMATCH
STATUS_CANNOT_UNDERSTAND = dimse.CANNOT_UNDERSTAND
#: PS3.7 C.5.x "Refused: SOP Class not supported": the request's SOP Class is not the abstract
#: syntax of the presentation context it came on (a CR C-STORE on the Verification context)
STATUS_SOP_CLASS_NOT_SUPPORTED = dimse.SOP_CLASS_NOT_SUPPORTED

#: Explicit VR Little Endian first: pynetdicom accepts the first syntax in *our* list that the
#: requestor proposed, and its own list starts with Implicit. Then Implicit, then what pydicom +
#: pylibjpeg can decode.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

VERIFICATION_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLED_AET = (0x01, 0x01, 0x07)   # permanent, service-user, called AE title not recognised
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
REJECT_HOST = (0x01, 0x01, 0x01)         # permanent, service-user, no reason given


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


def _answer_name(pdu: bytes | None) -> str | None:
    """``A-ASSOCIATE-RJ 1/2/2`` or ``A-ABORT reason 6`` for the PDU a refused peer was sent."""
    if not pdu:
        return None
    if pdu[0] == 0x03:
        return f"A-ASSOCIATE-RJ {pdu[7]}/{pdu[8]}/{pdu[9]}"
    return f"A-ABORT reason {pdu[9]}"


def _syntax_name(transfer_syntax: str) -> str:
    return UID(transfer_syntax).name


def _priority(req) -> int | None:
    """The C-STORE request's Priority (0x0002 LOW, 0x0000 MEDIUM, 0x0001 HIGH), None if unreadable."""
    try:
        value = int(req.Priority)
    except (AttributeError, TypeError, ValueError):
        return None
    return value if value in (0, 1, 2) else None


def _any_uid(value: Any) -> tuple[bool, str]:
    """For pynetdicom's ``_config.VALIDATORS["UI"]``: accept every UID a peer sends; the handlers
    check the ones they use (``spool.is_valid_uid``) and answer with a status."""
    return True, ""


def build_ae(settings: Settings) -> AE:
    """The Storage SCP's AE: our AE title and implementation identity, limits, timeouts, and the
    presentation contexts it accepts (every storage SOP class in :data:`TRANSFER_SYNTAXES`, and
    Verification). The conformance statement reads them from here."""
    n = settings.node
    ae = identify(AE(ae_title=n.ae_title))
    ae.maximum_pdu_size = n.max_pdu
    ae.maximum_associations = n.max_associations
    ae.network_timeout = n.network_timeout
    ae.acse_timeout = n.acse_timeout
    ae.dimse_timeout = n.dimse_timeout
    ae.require_called_aet = False  # checked in _on_requested so that the rejection is audited
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, VERIFICATION_SYNTAXES)
    return ae


class Receiver:
    """The pynetdicom AE plus the handlers bound to it. Dependencies come in through the
    constructor and the handler registration tuples, never globals."""

    def __init__(self, settings: Settings, ingest: Ingest, metrics=None) -> None:
        self.settings = settings
        self.ingest = ingest
        self.metrics = metrics
        self._assocs: weakref.WeakKeyDictionary[Any, AssociationInfo] = weakref.WeakKeyDictionary()
        #: Called with the association id once a peer has released an association that stored
        #: something (the scheduler's release rule for study completion); set by service.py.
        self.on_released: Callable[[str], None] | None = None
        self._abort_lines = PerKeyRate()  # one log line per host and minute for aborts (all audited)
        self.ae = build_ae(settings)
        self.server = None

    def bind(self) -> GuardedServer:
        """Listen on [node] host:port (raises OSError if it cannot); connections wait in the
        backlog until :meth:`serve`. Separate so that ``serve`` can hold the port before it
        sweeps or recovers anything."""
        from pynetdicom import _config

        from cxr_node.dicom.tls import server_context

        n = self.settings.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_DIMSE_RECV, note_command_set),
        ]
        # A malformed UID in a request (an 80-character SOP Instance UID) fails pynetdicom's check
        # while the DIMSE message is decoded, which aborts the association before any handler runs;
        # let it through to _on_store, which answers 0xC000 and says why (process-wide setting)
        _config.VALIDATORS["UI"] = _any_uid
        # pynetdicom's standard handlers only format debug lines (its loggers are held at WARNING,
        # logs.py), per PDU and DIMSE message, and on hostile input they raise (an Affected SOP
        # Class UID of two values): their traceback went to the log, and the exception stopped the
        # handlers bound after them (note_command_set) from running
        _config.LOG_HANDLER_LEVEL = "none"
        if threading.excepthook is not abort_when_a_thread_dies:
            abort_when_a_thread_dies.previous = threading.excepthook  # type: ignore[attr-defined]
            threading.excepthook = abort_when_a_thread_dies
        dul_log = logging.getLogger("pynetdicom.dul")
        if REPORTED_ABORT_FILTER not in dul_log.filters:
            dul_log.addFilter(REPORTED_ABORT_FILTER)
        ctx = server_context(self.settings.tls)
        if ctx is not None:
            ctx.sslsocket_class = LimitedSSLSocket
        guard = ConnectionGuard(n, self._on_refused, self._on_tls_failure, self._on_violation)
        guard.on_association_end = self._on_association_end
        self.server = self.ae.make_server((n.host, n.port), evt_handlers=handlers, ssl_context=ctx,
                                          server_class=GuardedServer, guard=guard)
        return self.server

    def serve(self) -> None:
        """Start accepting connections (in a daemon thread)."""
        threading.Thread(target=self.server.serve_forever, name="cxr-node-acceptor", daemon=True).start()

    def _on_tls_failure(self, host: str, port: int, reason: str) -> None:
        log.warning("TLS connection from %s:%d refused: %s", host, port, reason)
        self._audit("association.rejected", "failure", host=host, port=port, reason=reason,
                    detail={"stage": "tls"})

    def _on_refused(self, host: str, port: int, reason: str, held_back: int, answer: bytes | None = None) -> None:
        more = f" ({held_back} more from this host since the last report)" if held_back else ""
        said = _answer_name(answer)
        log.warning("connection from %s:%d closed%s: %s%s", host, port, f" with {said}" if said else "", reason, more)
        detail = {"held_back_since_last_row": held_back, "rate_limit": "one row per host and minute"}
        if said:
            detail["answer"] = said
        self._audit("connection.refused", "failure", host=host, port=port, reason=reason, detail=detail)

    def _on_violation(self, sock: PDULimit) -> None:
        info = sock.association
        if info is not None:
            info.abort_reason = sock.violation  # logged and audited with the association's counts in _on_aborted
            return
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            host, port = "?", 0
        log.warning("connection from %s:%s aborted: %s", host, port, sock.violation)
        self._audit("association.aborted", "failure", host=str(host), port=int(port), reason=sock.violation)

    # ------------------------------------------------------------------ association events

    def _audit(self, event: str, outcome: str = "success", **fields: Any) -> None:
        self.ingest.audit(event, outcome, **fields)

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        info = AssociationInfo(id=str(uuid.uuid4()), calling_aet=str(rq.primitive.calling_ae_title).strip(),
                               called_aet=str(rq.primitive.called_ae_title).strip(),
                               host=str(rq.address), port=int(rq.port))
        self._assocs[assoc] = info
        sock = getattr(assoc.dul.socket, "socket", None)
        if isinstance(sock, PDULimit):
            sock.association = info
        self._audit("association.opened", **info.fields())
        reason = self._refusal(info)
        if reason:
            rsd, text = reason
            info.rejected = True
            assoc.acse.send_reject(*rsd)
            assoc.kill()  # wait until the DUL has sent the A-ASSOCIATE-RJ (as pynetdicom's own rejections do)
            if self.metrics:
                self.metrics.associations.labels("rejected").inc()
            self._audit("association.rejected", "failure", reason=text,
                        detail={"result": rsd[0], "source": rsd[1], "diagnostic": rsd[2]}, **info.fields())
            log.warning("rejected association %s from %s@%s:%d: %s", info.id, info.calling_aet, info.host,
                        info.port, text)

    def _refusal(self, info: AssociationInfo) -> tuple[tuple[int, int, int], str] | None:
        import ipaddress

        n = self.settings.node
        if info.called_aet != n.ae_title:
            return REJECT_CALLED_AET, f"called AE title {info.called_aet!r} is not {n.ae_title!r}"
        if n.allowed_calling_aets and info.calling_aet not in n.allowed_calling_aets:
            return REJECT_CALLING_AET, f"calling AE title {info.calling_aet!r} is not in allowed_calling_aets"
        if n.allowed_hosts:
            try:
                addr = ipaddress.ip_address(info.host)
            except ValueError:
                return REJECT_HOST, f"peer address {info.host!r} is not an IP address"
            if addr.version == 6 and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if not any(addr in net for net in n.allowed_hosts if net.version == addr.version):
                return REJECT_HOST, f"host {info.host} is not in allowed_hosts"
        return None

    def _info(self, assoc) -> AssociationInfo | None:
        return self._assocs.get(assoc)

    def _on_accepted(self, event) -> None:
        info = self._info(event.assoc)
        if info:
            accepted = [cx.abstract_syntax for cx in event.assoc.accepted_contexts]
            self._audit("association.accepted", detail={"accepted_contexts": len(accepted)}, **info.fields())
            if self.metrics:
                self.metrics.associations.labels("accepted").inc()
            log.info("association %s from %s@%s:%d accepted", info.id, info.calling_aet, info.host, info.port)

    def _on_rejected(self, event) -> None:
        """pynetdicom's own rejections (ours are audited in _on_requested): max_associations reached."""
        info = self._info(event.assoc)
        if info:
            info.ended = True
        if info and not info.rejected:
            reason = f"local limit exceeded: {self.settings.node.max_associations} associations active " \
                     "([node] max_associations)"
            if self.metrics:
                self.metrics.associations.labels("rejected").inc()
            self._audit("association.rejected", "failure", reason=reason, **info.fields())
            log.warning("rejected association %s from %s@%s:%d: %s", info.id, info.calling_aet, info.host,
                        info.port, reason)

    def _on_association_end(self, assoc) -> None:
        """The association's thread has ended: one that neither released nor aborted through
        pynetdicom's events (its DUL thread died on the peer's data) is audited as aborted."""
        info = self._info(assoc)
        if info and not info.ended and not info.rejected:
            self._record_abort(assoc)

    def _on_released(self, event) -> None:
        info = self._info(event.assoc)
        if info:
            info.ended = True
            self._audit("association.released", detail=info.counts(), **info.fields())
            log.info("association %s released: %s", info.id, info.counts())
            if info.stored and self.on_released is not None:
                self.on_released(info.id)

    def _on_aborted(self, event) -> None:
        self._record_abort(event.assoc)

    def _record_abort(self, assoc) -> None:
        info = self._info(assoc)
        if info and info.abort_reason is None and assoc.dul.idle_timer_expired():
            info.abort_reason = (f"no complete PDU within {self.settings.node.network_timeout:g} s "
                                 "([node] network_timeout)")
        if info and not info.ended:
            info.ended = True
            self._audit("association.aborted", "failure", detail=info.counts(), reason=info.abort_reason,
                        **info.fields())
            held = self._abort_lines.take(info.host)
            if held is not None:
                log.warning("association %s from %s aborted%s: %s%s", info.id, info.host,
                            f" ({info.abort_reason})" if info.abort_reason else "", info.counts(),
                            f" ({held} more aborts from this host since the last line)" if held else "")

    def _on_echo(self, event) -> int:
        info = self._info(event.assoc)
        self._audit("echo.received", status=STATUS_SUCCESS, **(info.fields() if info else {}))
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ C-STORE

    def _on_store(self, event) -> int | Dataset:
        """Every C-STORE message ends here with a status from the table above (never pynetdicom's
        0xC211 "exception in the handler") and, unless it is stored, an ``instance.failed`` row."""
        info = self._info(event.assoc)
        req = event.request
        rq_sop = str(req.AffectedSOPInstanceUID or "")
        rq_class = str(req.AffectedSOPClassUID or "")
        size = 0
        header = None
        try:
            if getattr(req, UNSOLICITED_RSP_ATTR, False):
                raise InvalidInstanceError("a C-STORE-RSP, not a request: this node sent no C-STORE-RQ")
            for name, value in (("SOP Instance", rq_sop), ("SOP Class", rq_class)):
                if not value:
                    raise InvalidInstanceError(f"request's Affected {name} UID is empty")
                if not is_valid_uid(value):
                    raise InvalidInstanceError(f"request's Affected {name} UID invalid ({len(value)} chars)")
            why = bad_sop_class(event.assoc, req.MessageID)
            if why:
                raise InvalidInstanceError(f"request's Affected SOP Class UID invalid ({why})")
            size = req.DataSet.getbuffer().nbytes if req.DataSet is not None else 0
            if not size:
                raise InvalidInstanceError("the C-STORE-RQ carries no dataset")
            transfer_syntax = str(event.context.transfer_syntax)
            context_class = str(event.context.abstract_syntax)
            if rq_class != context_class:
                return self._fail(STATUS_SOP_CLASS_NOT_SUPPORTED,
                                  f"SOP Class not the presentation context's: {rq_class} on {context_class}",
                                  info, rq_sop, rq_class, header, size)
            # strictly in the negotiated syntax (pydicom would read the wrong one silently), header only
            with req.DataSet.getbuffer() as raw:
                fault = encoding_fault(raw, transfer_syntax)
            if fault:
                raise InvalidInstanceError(f"does not decode: {fault} ({_syntax_name(transfer_syntax)})")
            data = event.encoded_dataset(include_meta=True)
            size = len(data)
            header = read_header(data, pixels=UID(transfer_syntax).is_deflated)
            if header.sop_class_uid != rq_class:
                raise SOPClassMismatchError(f"dataset SOP Class {header.sop_class_uid} is not the request's")
            if header.sop_instance_uid != rq_sop:
                raise SOPClassMismatchError("dataset SOP Instance UID differs from the request's")
            stored = self.ingest.store(data, header, transfer_syntax, info, priority=_priority(req))
        except InvalidInstanceError as e:
            return self._fail(STATUS_CANNOT_UNDERSTAND, str(e), info, rq_sop, rq_class, header, size)
        except SOPClassMismatchError as e:
            return self._fail(STATUS_SOP_CLASS_MISMATCH, str(e), info, rq_sop, rq_class, header, size)
        except SpoolError as e:
            return self._fail(STATUS_OUT_OF_RESOURCES, str(e), info, rq_sop, rq_class, header, size)
        except SQLAlchemyError as e:
            log.error("database error storing %s: %s", rq_sop, db_error_text(e))
            return self._fail(STATUS_OUT_OF_RESOURCES, "database unavailable; instance not stored",
                              info, rq_sop, rq_class, header, size)
        except Exception as e:  # a fault of ours on the peer's data: said and audited, never 0xC211
            log.error("C-STORE %s could not be handled: %s: %s", rq_sop or "?", type(e).__name__,
                      redact_quoted(str(e))[:200])
            return self._fail(STATUS_CANNOT_UNDERSTAND, f"could not be read ({type(e).__name__})",
                              info, rq_sop, rq_class, header, size)
        if info:
            with info.lock:
                if stored:
                    info.stored += 1
                    info.bytes += size
                else:
                    info.duplicates += 1
        if self.metrics:
            self.metrics.instances.labels("stored" if stored else "duplicate").inc()
            if stored:
                self.metrics.bytes.inc(size)
        log.info("%s %s (study %s, %d bytes, %s) from %s", "stored" if stored else "duplicate", rq_sop,
                 header.study_uid, size, transfer_syntax, info.calling_aet if info else "?")
        return STATUS_SUCCESS

    def _fail(self, status: int, reason: str, info: AssociationInfo | None, sop: str, sop_class: str,
              header: Header | None, size: int) -> Dataset:
        log.warning("refused %s with 0x%04X: %s", sop, status, reason)
        if self.metrics:
            self.metrics.instances.labels("failed").inc()
        if info:
            with info.lock:
                info.failed += 1
        self.ingest.record_failure(status, reason, info, sop_instance_uid=sop if is_valid_uid(sop) else None,
                                   sop_class_uid=sop_class if is_valid_uid(sop_class) else None,
                                   header=header, size=size)
        return _status(status, reason)


def _priority(req) -> int | None:
    """The C-STORE request's Priority (0 medium, 1 high, 2 low), or None when it has none."""
    try:
        return int(req.Priority) if req.Priority is not None else None
    except (TypeError, ValueError):
        return None
