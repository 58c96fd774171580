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
  0xC000 cannot understand: does not decode, lacks or has malformed Study/Series/SOP UIDs
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
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
from cxr_node.errors import InvalidInstanceError, SOPClassMismatchError, SpoolError, db_error_text
from cxr_node.ingest import STATUS_SUCCESS, Header, Ingest, read_header
from cxr_node.spool import is_valid_uid

log = logging.getLogger(__name__)

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Explicit VR Little Endian first: pynetdicom accepts the first syntax in *our* list that the
#: requestor proposed (FIELD-NOTES). Then Implicit, then what pydicom + pylibjpeg can decode.
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

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLED_AET = (0x01, 0x01, 0x07)   # permanent, service-user, called AE title not recognised
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
REJECT_HOST = (0x01, 0x01, 0x01)         # permanent, service-user, no reason given


@dataclass
class AssociationInfo:
    id: str
    calling_aet: str
    called_aet: str
    host: str
    port: int
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fields(self) -> dict[str, Any]:
        return {"association_id": self.id, "calling_aet": self.calling_aet, "called_aet": self.called_aet,
                "host": self.host, "port": self.port}

    def counts(self) -> dict[str, int]:
        return {"stored": self.stored, "duplicates": self.duplicates, "failed": self.failed, "bytes": self.bytes}


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


class Receiver:
    """The pynetdicom AE plus the handlers bound to it. Dependencies come in through the
    constructor and the handler registration tuples, never globals."""

    def __init__(self, settings: Settings, ingest: Ingest, metrics=None) -> None:  # noqa: ANN001
        self.settings = settings
        self.ingest = ingest
        self.metrics = metrics
        self._assocs: weakref.WeakKeyDictionary[Any, AssociationInfo] = weakref.WeakKeyDictionary()
        self.ae = self._build_ae()
        self.server = None

    def _build_ae(self) -> AE:
        n = self.settings.node
        ae = AE(ae_title=n.ae_title)
        ae.maximum_pdu_size = n.max_pdu
        ae.maximum_associations = n.max_associations
        ae.network_timeout = n.network_timeout
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.require_called_aet = False  # checked in _on_requested so that the rejection is audited
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def start(self):
        n = self.settings.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        from cxr_node.tls import deferred_handshake_server_class, server_context

        ctx = server_context(self.settings.tls)
        if ctx is None:
            self.server = self.ae.start_server((n.host, n.port), block=False, evt_handlers=handlers)
            return self.server
        # TLS: pynetdicom's start_server() would handshake inside its accept loop (one silent peer
        # blocks everyone); serve with our server class instead, the same way start_server(block=False) does
        server_class = deferred_handshake_server_class(self._on_tls_failure, handshake_timeout=n.acse_timeout)
        self.server = self.ae.make_server((n.host, n.port), evt_handlers=handlers, ssl_context=ctx,
                                          server_class=server_class)
        threading.Thread(target=self.server.serve_forever, name="cxr-node-tls-acceptor", daemon=True).start()
        return self.server

    def _on_tls_failure(self, host: str, port: int, reason: str) -> None:
        log.warning("TLS connection from %s:%d refused: %s", host, port, reason)
        self._audit("association.rejected", "failure", host=host, port=port, reason=reason,
                    detail={"stage": "tls"})

    # ------------------------------------------------------------------ association events

    def _audit(self, event: str, outcome: str = "success", **fields: Any) -> None:
        self.ingest.audit(event, outcome, **fields)

    def _on_requested(self, event) -> None:  # noqa: ANN001
        assoc = event.assoc
        rq = assoc.requestor
        info = AssociationInfo(id=str(uuid.uuid4()), calling_aet=str(rq.primitive.calling_ae_title).strip(),
                               called_aet=str(rq.primitive.called_ae_title).strip(),
                               host=str(rq.address), port=int(rq.port))
        self._assocs[assoc] = info
        self._audit("association.opened", **info.fields())
        reason = self._refusal(info)
        if reason:
            rsd, text = reason
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

    def _info(self, assoc) -> AssociationInfo | None:  # noqa: ANN001
        return self._assocs.get(assoc)

    def _on_accepted(self, event) -> None:  # noqa: ANN001
        info = self._info(event.assoc)
        if info:
            accepted = [cx.abstract_syntax for cx in event.assoc.accepted_contexts]
            self._audit("association.accepted", detail={"accepted_contexts": len(accepted)}, **info.fields())
            if self.metrics:
                self.metrics.associations.labels("accepted").inc()
            log.info("association %s from %s@%s:%d accepted", info.id, info.calling_aet, info.host, info.port)

    def _on_released(self, event) -> None:  # noqa: ANN001
        info = self._info(event.assoc)
        if info:
            self._audit("association.released", detail=info.counts(), **info.fields())
            log.info("association %s released: %s", info.id, info.counts())

    def _on_aborted(self, event) -> None:  # noqa: ANN001
        info = self._info(event.assoc)
        if info:
            self._audit("association.aborted", "failure", detail=info.counts(), **info.fields())
            log.warning("association %s aborted: %s", info.id, info.counts())

    def _on_echo(self, event) -> int:  # noqa: ANN001
        info = self._info(event.assoc)
        self._audit("echo.received", status=STATUS_SUCCESS, **(info.fields() if info else {}))
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ C-STORE

    def _on_store(self, event) -> int | Dataset:  # noqa: ANN001
        info = self._info(event.assoc)
        req = event.request
        rq_sop = str(req.AffectedSOPInstanceUID)
        rq_class = str(req.AffectedSOPClassUID)
        transfer_syntax = str(event.context.transfer_syntax)
        data = event.encoded_dataset(include_meta=True)
        size = len(data)
        header = None
        try:
            header = read_header(data)
            if header.sop_class_uid != rq_class:
                raise SOPClassMismatchError(f"dataset SOP Class {header.sop_class_uid} is not the request's")
            if header.sop_instance_uid != rq_sop:
                raise SOPClassMismatchError("dataset SOP Instance UID differs from the request's")
            stored = self.ingest.store(data, header, transfer_syntax, info)
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
