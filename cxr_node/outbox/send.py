"""Outgoing DICOM: C-ECHO, and C-STORE of result files for the outbox."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cxr_node.config import Destination, Settings
from cxr_node.dicom.status import PERMANENT, TRANSIENT, SendOutcome, classify
from cxr_node.dicom.uids import identify
from cxr_node.errors import NetworkError


def _tls_args(settings: Settings, dest: Destination):
    if not dest.tls:
        return None
    from cxr_node.dicom.tls import client_context

    return (client_context(settings.tls), dest.host)


def echo_ae(settings: Settings, timeout: float = 10.0) -> AE:
    """The AE that C-ECHOes a destination: Verification with pynetdicom's default transfer syntaxes."""
    ae = identify(AE(ae_title=settings.node.ae_title))
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    return ae


def echo(settings: Settings, dest: Destination, timeout: float = 10.0) -> int:
    """C-ECHO ``dest`` as our AE title; return the DIMSE status or raise NetworkError."""
    ae = echo_ae(settings, timeout)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=settings.node.max_pdu,
                         tls_args=_tls_args(settings, dest))
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        raise NetworkError(f"{where} rejected the association (result {rj.result_str}, "
                           f"source {rj.source_str}, reason {rj.reason_str}): check the AE titles")
    if not assoc.is_established:
        raise NetworkError(f"could not associate with {where}: no answer within {timeout:g}s "
                           "(is it running, and is the host/port right?)")
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        raise NetworkError(f"{where} sent no C-ECHO response within {timeout:g}s")
    return int(rsp.Status)


# ---------------------------------------------------------------------------------- C-STORE

classify_status = classify  # the name the outbox's tests know; the table is cxr_node.dicom.status


@dataclass(frozen=True)
class FileToSend:
    path: Path
    sop_class_uid: str
    transfer_syntax: str


def store_files(settings: Settings, dest: Destination, files: Sequence[FileToSend],
                timeout: float = 30.0) -> list[SendOutcome]:
    """C-STORE ``files`` to ``dest`` over one association proposing only the SOP classes and
    transfer syntaxes they need. Returns one outcome per file, in order; never raises for
    network trouble (that is a transient outcome)."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes on disk as they are, in chunks
    ae = identify(AE(ae_title=settings.node.ae_title))
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    needed: dict[str, set[str]] = {}
    for f in files:
        needed.setdefault(f.sop_class_uid, set()).add(f.transfer_syntax)
    for sop_class, syntaxes in needed.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=settings.node.max_pdu,
                             tls_args=_tls_args(settings, dest))
    except OSError as e:
        return [SendOutcome(TRANSIENT, None, f"cannot reach {where}: {e}")] * len(files)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        kind = PERMANENT if rj.result == 0x01 else TRANSIENT
        why = f"{where} rejected the association ({rj.result_str}: {rj.reason_str})"
        return [SendOutcome(kind, None, why)] * len(files)
    if not assoc.is_established:
        return [SendOutcome(TRANSIENT, None, f"could not associate with {where} (down, or no answer in {timeout:g}s)")] \
            * len(files)
    out: list[SendOutcome] = []
    try:
        for f in files:
            if not assoc.is_established:
                out.append(SendOutcome(TRANSIENT, None, f"association with {where} ended before this file"))
                continue
            try:
                rsp = assoc.send_c_store(f.path)
            except ValueError as e:  # no accepted presentation context for this object
                out.append(SendOutcome(PERMANENT, None, f"{where} accepts no context for it: {e}"))
                continue
            if "Status" not in rsp:
                out.append(SendOutcome(TRANSIENT, None, f"no C-STORE response from {where} (timeout or abort)"))
            else:
                out.append(classify_status(int(rsp.Status)))
    finally:
        if assoc.is_established:
            assoc.release()
    return out
