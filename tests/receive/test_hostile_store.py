"""Issue 30, points 2 and 4c: C-STORE messages the node used to answer with pynetdicom's 0xC211
("exception in the handler"), or not at all, unaudited: an empty Affected SOP Class UID, a
C-STORE-RSP sent to the node, a request without a dataset; and a Deflate dataset that does not
inflate, whose reason read only "error". One daemon for the module, raw PDUs on real sockets."""

from __future__ import annotations

import struct

import pytest
from test_hardening import QUIET, read_pdu, release
from test_hostile import CR, EXPLICIT, _associate, _command_set, _encoded, _pdata, raw_store

DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.fixture(scope="module")
def store_node(tmp_path_factory):
    from conftest import Node

    node = Node(tmp_path_factory.mktemp("store") / "node", extra=QUIET).start()
    yield node
    node.kill()


def _status_of(body: bytes) -> tuple[int, str]:
    cmd = body[6:]
    at = cmd.index(b"\x00\x00\x00\x09\x02\x00\x00\x00")
    status = struct.unpack_from("<H", cmd, at + 8)[0]
    comment = ""
    if b"\x00\x00\x02\x09" in cmd:
        at = cmd.index(b"\x00\x00\x02\x09")
        comment = cmd[at + 8:at + 8 + struct.unpack_from("<L", cmd, at + 4)[0]].decode().strip("\0 ")
    return status, comment


def _released(node, calling: str) -> dict:
    (row,) = node.wait_for_event("association.released", calling_aet=calling)
    return row["detail"]


def test_empty_affected_sop_class_uid_gets_c000_and_an_audit_row(store_node, tmp_path):
    """Before: 0xC211, no instance.failed row, and the association's summary said failed: 0."""
    from dicomgen import make_cr, uid

    data, _, sop = _encoded(make_cr(tmp_path / "cr.dcm", sop_uid=uid(), rows=32, cols=32), False)
    status, comment = raw_store(store_node.port, CR, EXPLICIT, data, "", sop, calling=b"EMPTYCLS")
    assert (status, comment) == (0xC000, "request's Affected SOP Class UID is empty"), (hex(status), comment)
    (row,) = store_node.wait_for_event("instance.failed", sop_instance_uid=sop)
    assert row["status"] == 0xC000 and "SOP Class UID is empty" in row["reason"]
    assert _released(store_node, "EMPTYCLS")["failed"] == 1
    assert not [p for p in store_node.spool_files() if p.is_file()]


def test_a_c_store_rsp_sent_to_the_node_gets_c000_and_an_audit_row(store_node):
    """Before: pynetdicom ignored it (the peer waited for dimse_timeout) or answered 0xC211."""
    sock = _associate(store_node.port, CR, EXPLICIT, calling=b"RSPSENDER")
    try:
        for with_message_id in (False, True):
            elements = [(0x00000002, CR.encode()), (0x00000100, struct.pack("<H", 0x8001))]
            if with_message_id:
                elements.append((0x00000110, struct.pack("<H", 9)))
            elements += [(0x00000120, struct.pack("<H", 7)), (0x00000800, struct.pack("<H", 0x0101)),
                         (0x00000900, struct.pack("<H", 0)), (0x00001000, b"1.2.3.4\0")]
            sock.sendall(_pdata(1, 0x03, _command_set(*elements)))
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x04, pdu_type
            status, comment = _status_of(body)
            assert status == 0xC000 and "C-STORE-RSP, not a request" in comment, (hex(status), comment)
        release(sock)
    finally:
        sock.close()
    rows = store_node.wait_for_event("instance.failed", calling_aet="RSPSENDER")
    assert len(rows) == 2 and all(r["status"] == 0xC000 for r in rows), rows
    assert _released(store_node, "RSPSENDER")["failed"] == 2


def test_a_c_store_rq_without_a_dataset_gets_c000(store_node):
    sock = _associate(store_node.port, CR, EXPLICIT, calling=b"NODATASET")
    try:
        cmd = _command_set((0x00000002, CR.encode()), (0x00000100, struct.pack("<H", 0x0001)),
                           (0x00000110, struct.pack("<H", 3)), (0x00000700, struct.pack("<H", 0)),
                           (0x00000800, struct.pack("<H", 0x0101)), (0x00001000, b"1.2.3.4\0"))
        sock.sendall(_pdata(1, 0x03, cmd))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        assert _status_of(body) == (0xC000, "the C-STORE-RQ carries no dataset")
        release(sock)
    finally:
        sock.close()
    assert _released(store_node, "NODATASET")["failed"] == 1


def test_a_deflate_dataset_that_does_not_inflate_names_what_failed(store_node, tmp_path):
    """Before: "dataset does not decode: error" (zlib's exception class is called error)."""
    from dicomgen import uid

    sop = uid()
    status, comment = raw_store(store_node.port, CR, DEFLATED, b"\x05\xff" * 500, CR, sop, calling=b"DEFLATER")
    (row,) = store_node.wait_for_event("instance.failed", sop_instance_uid=sop)
    assert status == 0xC000, hex(status)
    assert "Deflate-compressed dataset does not inflate (zlib: " in row["reason"], row["reason"]
    assert comment == row["reason"][:64]


def test_no_c211_and_no_traceback_in_the_log(store_node):
    text = store_node.log
    assert "0xC211" not in text and "Exception in handler" not in text
    assert "Traceback" not in text
