"""Ingest: what happens to a received instance between the C-STORE handler and the Success status.

Header checks (does it decode, are its UIDs usable as paths), the durable write (spool, see
``spool.py``) and the database row with its audit event, duplicates (stored once, audited), and
start-up recovery of spooled files that lost their database row in a crash. Nothing here knows
about the network: ``receive.py`` maps the exceptions raised here to DIMSE statuses.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cxr_node.audit import trail as audit
from cxr_node.audit.backlog import AuditBacklog
from cxr_node.db.models import Instance, utcnow
from cxr_node.db.session import Database
from cxr_node.dicom import status as dimse
from cxr_node.dicom.uids import is_valid_uid
from cxr_node.eligibility import rules as eligibility
from cxr_node.errors import InvalidInstanceError, db_error_text
from cxr_node.receive.association import AssociationInfo
from cxr_node.receive.spool import Spool
from cxr_node.study import scheduling
from cxr_node.study import states as studies

log = logging.getLogger(__name__)

#: DIMSE status recorded on stored and duplicate rows (the peer got Success for both).
STATUS_SUCCESS = dimse.SUCCESS

@dataclass(frozen=True)
class Header:
    """What the handler needs from a received dataset; never patient names."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str | None


def read_header(file_bytes: bytes, pixels: bool = True) -> Header:
    """Decode a Part 10 byte stream far enough to trust it; raise InvalidInstanceError if not.
    ``pixels=False`` stops before Pixel Data (the receiver, whose ``dataset_check`` has checked
    the pixel data's structure and length already)."""
    try:
        ds = dcmread(BytesIO(file_bytes), stop_before_pixels=not pixels)
        _check_complete(ds)
        raw = {k: ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
        patient_id = ds.get("PatientID")
    except InvalidInstanceError:
        raise
    except Exception as e:  # pydicom raises many types on malformed input; all mean "cannot decode"
        raise InvalidInstanceError(f"dataset does not decode: {_decode_fault(e)}") from e
    missing = [k for k, v in raw.items() if not v]
    if missing:
        raise InvalidInstanceError(f"missing {', '.join(missing)}")
    uids = {k: str(v).strip("\0 ") for k, v in raw.items()}
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise InvalidInstanceError(f"malformed {', '.join(bad)}")
    return Header(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"],
                  uids["SOPClassUID"], str(patient_id).strip() if patient_id else None)


def _decode_fault(e: Exception) -> str:
    """What failed, in words a person can act on (issue 30: a Deflate dataset that did not inflate
    read only "error", zlib's exception name). Quoted values (a library may quote what it judged,
    a patient name among them) are withheld."""
    import zlib

    from cxr_node.logs import redact_quoted

    text = redact_quoted(str(e))[:120]
    if isinstance(e, zlib.error):
        return f"the Deflate-compressed dataset does not inflate (zlib: {text or 'no detail'})"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_complete(ds: Dataset) -> None:
    """pydicom returns a short value when an element's declared length runs past the end of the
    data; a dataset like that is truncated, not stored. Checks raw top-level elements only."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) != length:
            raise InvalidInstanceError(f"dataset does not decode: {tag} truncated ({len(value)} of {length} B)")


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
              assoc: AssociationInfo | None, priority: int | None = None) -> bool:
        """Make one instance durable and record it. Returns False if it was already stored.
        ``priority``: the C-STORE request's DIMSE Priority (the study is scheduled by it).

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
                self._record_stored(header, rel, len(file_bytes), transfer_syntax, assoc, "instance.stored",
                                    priority=priority)
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
                       event: str, priority: int | None = None) -> None:
        now = utcnow()
        reason = eligibility.sop_class_reason(h.sop_class_uid)  # stored anyway, marked
        a = assoc.fields() if assoc else {}
        with self.db.transaction() as s:
            version = studies.note_instance(s, h.study_uid, h.patient_id, now, a.get("association_id"),
                                            rank=None if priority is None else scheduling.dimse_rank(priority))
            s.add(Instance(sop_instance_uid=h.sop_instance_uid, study_uid=h.study_uid, series_uid=h.series_uid,
                           sop_class_uid=h.sop_class_uid, transfer_syntax=ts, path=str(rel), bytes=size,
                           patient_id=h.patient_id, triage_eligible=reason is None,
                           not_for_triage_reason=reason.text if reason else None,
                           study_version=version, association_id=a.get("association_id"),
                           calling_aet=a.get("calling_aet"), received_at=now, dimse_priority=priority))
            common = dict(study_uid=h.study_uid, series_uid=h.series_uid, sop_instance_uid=h.sop_instance_uid,
                          sop_class_uid=h.sop_class_uid, patient_id=h.patient_id, **a)
            audit.record(s, event, ts=now, transfer_syntax=ts, bytes=size, status=STATUS_SUCCESS,
                         detail={"path": str(rel), "study_version": version,
                                 **({"dimse_priority": priority} if priority is not None else {})}, **common)
            if reason:
                audit.record(s, "instance.not_for_triage", "warning", ts=now, reason=reason.text,
                             detail={"refusal_code": reason.code.value}, **common)

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
