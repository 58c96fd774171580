"""Outgoing DICOM: C-ECHO now; C-STORE of results through the outbox comes with issue 4."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cxr_node.config import Destination, Settings
from cxr_node.errors import NetworkError


def echo(settings: Settings, dest: Destination, timeout: float = 10.0) -> int:
    """C-ECHO ``dest`` as our AE title; return the DIMSE status or raise NetworkError."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=settings.node.max_pdu)
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
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
