"""The Storage SCP: AE, presentation contexts, allow-lists, and the C-STORE handler.

The C-STORE handler takes the bytes exactly as received, checks the UIDs, makes the instance
durable (spool + database) and only then answers Success. It never waits on later stages:
study completion is a scheduler job that reads the database.

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
from io import BytesIO
from typing import Any

from pydicom import dcmread
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
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cxr_node import audit, studies
from cxr_node.audit_backlog import AuditBacklog
from cxr_node.config import Settings
from cxr_node.db.models import Instance, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import InvalidInstanceError, SOPClassMismatchError, SpoolError, db_error_text
from cxr_node.spool import Spool, is_valid_uid

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

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

#: Storage SOP classes whose films are candidates for triage. Everything else is stored too
#: (a modality is never refused what a PACS would take) but marked not-for-triage.
TRIAGE_SOP_CLASSES = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX for presentation",
    DigitalXRayImageStorageForProcessing: "DX for processing",
    SecondaryCaptureImageStorage: "Secondary Capture",
}

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


@dataclass(frozen=True)
class Header:
    """What the handler needs from a received dataset; never patient names."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str | None


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


def read_header(file_bytes: bytes) -> Header:
    """Decode a Part 10 byte stream far enough to trust it; raise InvalidInstanceError if not."""
    try:
        ds = dcmread(BytesIO(file_bytes))
        _check_complete(ds)
        raw = {k: ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
        patient_id = ds.get("PatientID")
    except InvalidInstanceError:
        raise
    except Exception as e:  # pydicom raises many types on malformed input; all mean "cannot decode"
        raise InvalidInstanceError(f"dataset does not decode: {type(e).__name__}") from e
    missing = [k for k, v in raw.items() if not v]
    if missing:
        raise InvalidInstanceError(f"missing {', '.join(missing)}")
    uids = {k: str(v).strip("\0 ") for k, v in raw.items()}
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise InvalidInstanceError(f"malformed {', '.join(bad)}")
    return Header(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"],
                  uids["SOPClassUID"], str(patient_id).strip() if patient_id else None)


def _check_complete(ds: Dataset) -> None:
    """pydicom returns a short value when an element's declared length runs past the end of the
    data; a dataset like that is truncated, not stored. Checks raw top-level elements only."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) != length:
            raise InvalidInstanceError(f"dataset does not decode: {tag} truncated ({len(value)} of {length} B)")


def triage_eligibility(sop_class_uid: str) -> str | None:
    """None when the SOP class can be triaged, else the reason it will not be."""
    if sop_class_uid in TRIAGE_SOP_CLASSES:
        return None
    from pydicom.uid import UID

    return f"SOP class {UID(sop_class_uid).name} is not a radiograph class cxr-node triages"


class Ingest:
    """Spool + database for received instances. Shared by the C-STORE handler and start-up
    recovery; every method is safe to call from many association threads at once."""

    def __init__(self, db: Database, spool: Spool, backlog: AuditBacklog | None = None) -> None:
        self.db = db
        self.spool = spool
        self.backlog = backlog  # audit events kept on disk while the database is unreachable
        self._commit_lock = threading.Lock()

    def is_stored(self, sop_instance_uid: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid == sop_instance_uid)) is not None

    def store(self, file_bytes: bytes, header: Header, transfer_syntax: str,
              assoc: AssociationInfo | None) -> bool:
        """Make one instance durable and record it. Returns False if it was already stored.

        Raises SpoolError (disk) or SQLAlchemyError (database); nothing is left in the spool then.
        """
        if self.is_stored(header.sop_instance_uid):
            self._record_duplicate(header, len(file_bytes), assoc)
            return False
        rel = self.spool.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        tmp = self.spool.write_temp(file_bytes, header.sop_instance_uid)  # outside the lock: slow part
        with self._commit_lock:
            if self.is_stored(header.sop_instance_uid):  # a parallel association won the race
                self.spool.discard(tmp)
                self._record_duplicate(header, len(file_bytes), assoc)
                return False
            self.spool.commit(tmp, rel)
            try:
                self._record_stored(header, rel, len(file_bytes), transfer_syntax, assoc, "instance.stored")
            except IntegrityError:
                if self.is_stored(header.sop_instance_uid):  # another node sharing the database recorded it
                    self._record_duplicate(header, len(file_bytes), assoc)
                    return False
                self.spool.remove(rel)
                raise
            except BaseException:
                self.spool.remove(rel)  # failure status means "not stored": leave no orphan behind
                raise
        return True

    def _record_stored(self, h: Header, rel, size: int, ts: str, assoc: AssociationInfo | None,
                       event: str) -> None:
        now = utcnow()
        reason = triage_eligibility(h.sop_class_uid)
        a = assoc.fields() if assoc else {}
        with self.db.transaction() as s:
            version = studies.note_instance(s, h.study_uid, h.patient_id, now, a.get("association_id"))
            s.add(Instance(sop_instance_uid=h.sop_instance_uid, study_uid=h.study_uid, series_uid=h.series_uid,
                           sop_class_uid=h.sop_class_uid, transfer_syntax=ts, path=str(rel), bytes=size,
                           patient_id=h.patient_id, triage_eligible=reason is None, not_for_triage_reason=reason,
                           study_version=version, association_id=a.get("association_id"),
                           calling_aet=a.get("calling_aet"), received_at=now))
            common = dict(study_uid=h.study_uid, series_uid=h.series_uid, sop_instance_uid=h.sop_instance_uid,
                          sop_class_uid=h.sop_class_uid, patient_id=h.patient_id, **a)
            audit.record(s, event, ts=now, transfer_syntax=ts, bytes=size, status=STATUS_SUCCESS,
                         detail={"path": str(rel), "study_version": version}, **common)
            if reason:
                audit.record(s, "instance.not_for_triage", ts=now, reason=reason, **common)

    def _record_duplicate(self, h: Header, size: int, assoc: AssociationInfo | None) -> None:
        with self.db.transaction() as s:
            audit.record(s, "instance.duplicate", study_uid=h.study_uid, series_uid=h.series_uid,
                         sop_instance_uid=h.sop_instance_uid, sop_class_uid=h.sop_class_uid,
                         patient_id=h.patient_id, bytes=size, status=STATUS_SUCCESS,
                         reason="SOP Instance UID already stored; kept the first copy",
                         **(assoc.fields() if assoc else {}))

    def record_failure(self, status: int, reason: str, assoc: AssociationInfo | None, *,
                       sop_instance_uid: str | None = None, sop_class_uid: str | None = None,
                       header: Header | None = None, size: int | None = None) -> None:
        fields: dict[str, Any] = dict(sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid)
        if header:
            fields.update(study_uid=header.study_uid, series_uid=header.series_uid, patient_id=header.patient_id)
        fields.update(status=status, reason=reason, bytes=size, **(assoc.fields() if assoc else {}))
        self.audit("instance.failed", "failure", **fields)

    def audit(self, event: str, outcome: str = "success", **fields: Any) -> None:
        """Write one audit event; while the database is unreachable it goes to the on-disk backlog
        (replayed later), and the peer still gets its answer."""
        ts = utcnow()
        try:
            with self.db.transaction() as s:
                audit.record(s, event, outcome, ts=ts, **fields)
        except SQLAlchemyError as e:
            kept = self.backlog is not None and self.backlog.add(event, outcome, fields, ts)
            log.error("could not write audit event %s (%s): %s", event,
                      "kept in the audit backlog" if kept else "not kept", db_error_text(e))

    def recover(self) -> int:
        """Register spooled files that have no database row (a crash between rename and commit)."""
        recovered = 0
        with self.db.session() as s:
            known = set(s.scalars(select(Instance.path)))
        for rel in self.spool.iter_files():
            if str(rel) in known:
                continue
            path = self.spool.spool_dir / rel
            data = path.read_bytes()
            try:
                h = read_header(data)
                ts = str(dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
            except (InvalidInstanceError, AttributeError) as e:
                log.error("spooled file %s is unreadable (%s); left in place for inspection", rel, e)
                continue
            if self.is_stored(h.sop_instance_uid):
                continue
            try:
                self._record_stored(h, rel, len(data), ts, None, "instance.recovered")
            except IntegrityError:  # another node sharing the database recorded it meanwhile
                continue
            recovered += 1
            log.warning("recovered spooled instance %s (no database row after a crash)", h.sop_instance_uid)
        return recovered


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
