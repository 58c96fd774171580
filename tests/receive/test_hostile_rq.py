"""Issue 30, round three of the hostile-peer fuzzing, point 1: every way an association ends
before it is established (a rejection for each reason, an abort, a close, a reset) frees its slot
at once and is audited. Raw sockets from 127.0.0.2 / .3 against the real daemon; the well-behaved
sender (dcmtk's echoscu, pynetdicom) comes from 127.0.0.1. Pure field checks: test_associate_check.
"""

from __future__ import annotations

import socket
import time

import pytest
from test_hardening import QUIET, _item, associate_rq, read_pdu, release
from test_hostile import HOSTS, _connect, _echo_within, _reset

RJ_VERSION = bytes.fromhex("03000000000400010202")  # the answer the issue quotes


def rq(*, pdu_type: int = 1, version: bytes = b"\0\1", called: bytes = b"CXRNODE".ljust(16),
       calling: bytes = b"WALKER".ljust(16), app: bytes | None = None, pcs: bytes | None = None,
       user: bytes | None = None, length_delta: int = 0) -> bytes:
    """A Verification A-ASSOCIATE-RQ, each field replaceable (PS3.8 table 9-11)."""
    app = _item(0x10, b"1.2.840.10008.3.1.1.1") if app is None else app
    if pcs is None:
        pcs = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    if user is None:
        user = _item(0x50, _item(0x51, (16384).to_bytes(4, "big")) + _item(0x52, b"1.2.826.0.1.3680043.10.1394.9"))
    body = version + b"\0\0" + called + calling + bytes(32) + app + pcs + user
    return bytes([pdu_type, 0]) + (len(body) + length_delta).to_bytes(4, "big") + body


def _abort(reason: int) -> bytes:
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, reason])


def _rj(result: int, source: int, reason: int) -> bytes:
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])


AC = b"AC"
PC = bytes([1, 0, 0, 0])
ABSTRACT, TS = _item(0x30, b"1.2.840.10008.1.1"), _item(0x40, b"1.2.840.10008.1.2")
MAXLEN, IMPL = _item(0x51, (16384).to_bytes(4, "big")), _item(0x52, b"1.2.826.0.1.3680043.10.1394.9")

#: name -> (request, the answer it must get: a whole PDU, or AC for an A-ASSOCIATE-AC)
FIELDS = {
    "PDU type 0x02": (rq(pdu_type=0x02), _abort(2)),
    "PDU type 0x09": (rq(pdu_type=0x09), _abort(1)),
    "PDU length 60 short": (rq(length_delta=-60), _abort(6)),
    "PDU length 100 short (fixed fields cut)": (rq(length_delta=-100), _abort(6)),
    "version 0x0002": (rq(version=b"\0\2"), RJ_VERSION),
    "version 0x0000": (rq(version=b"\0\0"), RJ_VERSION),
    "version 0x0003 (bit 0 set: version 1)": (rq(version=b"\0\3"), AC),
    "called AE all spaces": (rq(called=b" " * 16), _rj(1, 1, 7)),
    "called AE with a control character": (rq(called=b"CXR\x01NODE".ljust(16)), _rj(1, 1, 7)),
    "called AE another node's": (rq(called=b"OTHERNODE".ljust(16)), _rj(1, 1, 7)),
    "calling AE all spaces": (rq(calling=b" " * 16), _rj(1, 1, 3)),
    "calling AE not ASCII": (rq(calling=b"\xff\xfeWALKER".ljust(16)), _rj(1, 1, 3)),
    "calling AE with a backslash": (rq(calling=b"WAL\\KER".ljust(16)), _rj(1, 1, 3)),
    "application context item type 0x11": (rq(app=_item(0x11, b"1.2.840.10008.3.1.1.1")), _abort(4)),
    "application context name 1.2.3": (rq(app=_item(0x10, b"1.2.3")), _rj(1, 1, 2)),
    "application context length past the PDU": (rq(app=b"\x10\x00\xff\xf0" + b"1.2.840.10008.3.1.1.1"), _abort(6)),
    "no application context": (rq(app=b""), _abort(5)),
    "presentation context item type 0x22": (rq(pcs=_item(0x22, PC + ABSTRACT + TS)), _abort(4)),
    "presentation context ID even": (rq(pcs=_item(0x20, bytes([2, 0, 0, 0]) + ABSTRACT + TS)), _abort(6)),
    "presentation context item of 2 bytes": (rq(pcs=_item(0x20, b"\1\0")), _abort(6)),
    "presentation context length past its sub-items": (rq(pcs=b"\x20\x00\x00\x40" + PC + ABSTRACT + TS), _abort(6)),
    "abstract syntax sub-item type 0x31": (rq(pcs=_item(0x20, PC + _item(0x31, b"1.2.840.10008.1.1") + TS)),
                                           _abort(4)),
    "transfer syntax sub-item type 0x41": (rq(pcs=_item(0x20, PC + ABSTRACT + _item(0x41, b"1.2.840.10008.1.2"))),
                                           _abort(4)),
    "no transfer syntax": (rq(pcs=_item(0x20, PC + ABSTRACT)), _abort(6)),
    "abstract syntax length past the item": (rq(pcs=_item(0x20, PC + b"\x30\x00\x00\x99" + b"1.2.840.10008.1.1")),
                                             _abort(6)),
    "user information item type 0x51": (rq(user=_item(0x51, MAXLEN + IMPL)), _abort(4)),
    "no user information": (rq(user=b""), _abort(6)),
    "maximum length sub-item of 3 bytes": (rq(user=_item(0x50, _item(0x51, b"\0\x40\0") + IMPL)), _abort(6)),
    "user sub-item type 0x5F": (rq(user=_item(0x50, MAXLEN + IMPL + _item(0x5F, b"x"))), _abort(4)),
    "user sub-item length past the item": (rq(user=_item(0x50, MAXLEN + b"\x52\x00\x00\x7f" + b"1.2")), _abort(6)),
    "two maximum length sub-items": (rq(user=_item(0x50, MAXLEN + MAXLEN + IMPL)), _abort(5)),
}


def _answer(port: int, source: str, pdu: bytes) -> bytes:
    """Send ``pdu``; the whole PDU that comes back (AC for an A-ASSOCIATE-AC, released at once)."""
    s = _connect(port, source)
    try:
        s.sendall(pdu)
        pdu_type, body = read_pdu(s)
        if pdu_type == 0x02:
            release(s)
            return AC
        return bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body
    finally:
        s.close()


def _echo_soon(port: int, seconds: float = 3.0) -> float:
    """A pynetdicom C-ECHO from 127.0.0.1 until one is accepted (at most ``seconds``): a slot
    still held by the last hostile peer makes it fail with "local limit exceeded"."""
    from pynetdicom import AE

    ae = AE(ae_title="WELLBEHAVED")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 5
    t0 = time.monotonic()
    while True:
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            assert status.Status == 0
            return time.monotonic() - t0
        if time.monotonic() - t0 > seconds:
            pytest.fail(f"no C-ECHO accepted within {seconds} s: a slot is still held")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def walk_node(tmp_path_factory):
    """One daemon for the module: two association slots, so one a hostile peer kept shows."""
    from conftest import Node

    node = Node(tmp_path_factory.mktemp("walk") / "node", extra_node="max_associations = 2", extra=QUIET).start()
    yield node
    node.kill()


def test_protocol_version_2_from_two_hosts_then_a_third_host_echoes_within_5_s(walk_node):
    """Before: 16 of these (8 from each of two hosts), each answered with the A-ASSOCIATE-RJ
    below by pynetdicom's state machine, locked every other sender out for 29.8 s, unaudited."""
    node = walk_node
    answers = []
    for host in HOSTS:
        for _ in range(8):
            answers.append(_answer(node.port, host, associate_rq(b"VERSION2")[:6] + b"\0\2"
                                   + associate_rq(b"VERSION2")[8:]))
    took = _echo_within(node.port, 5)
    print(f"\nC-ECHO from 127.0.0.1 answered in {took:.2f} s after 16 protocol-version-2 requests")
    assert answers == [RJ_VERSION] * 16, answers
    for host in HOSTS:  # audited, once per host and minute (the rest counted in the next row)
        rows = [r for r in node.events("connection.refused", host=host) if "protocol version" in (r["reason"] or "")]
        assert len(rows) == 1, rows
        assert "0x0002 is not supported" in rows[0]["reason"]
        assert rows[0]["detail"]["answer"] == "A-ASSOCIATE-RJ 1/2/2", rows[0]
    assert not node.events("association.rejected", calling_aet="WELLBEHAVED")


def test_each_field_of_a_request_answered_precisely_and_no_slot_kept(walk_node):
    """Walks every field of an otherwise valid A-ASSOCIATE-RQ: PDU type and length, protocol
    version, called and calling AE titles, each item's and sub-item's type and length. Each gets
    its precise answer (A-ASSOCIATE-RJ with result/source/reason, or A-ABORT with its reason) at
    once, and a well-behaved C-ECHO is accepted right after it (a held slot would refuse it)."""
    node = walk_node
    wrong = {}
    for i, (name, (pdu, want)) in enumerate(FIELDS.items()):
        t0 = time.monotonic()
        try:
            got = _answer(node.port, HOSTS[i % 2], pdu)
        except (ConnectionError, OSError) as e:
            got = f"no answer: {e}".encode()
        if got != want or time.monotonic() - t0 > 3:
            wrong[name] = (got.hex(), want.hex(), round(time.monotonic() - t0, 2))
        _echo_soon(node.port)
    assert not wrong, "\n".join(f"{k}: got {g}, want {w} after {t} s" for k, (g, w, t) in wrong.items())
    rows = node.events("connection.refused")
    assert rows and all(r["detail"].get("answer") for r in rows if r["host"] in HOSTS), rows[:3]
    assert "Traceback" not in node.log


def test_local_limit_rejection_abort_close_and_reset_before_established_free_the_slot(walk_node):
    """pynetdicom's own rejection (local limit exceeded, 2/3/2) and a requestor that aborts,
    closes or resets right after its request: each frees the slot at once and is audited once."""
    node = walk_node
    held = [_connect(node.port, "127.0.0.1") for _ in range(2)]  # both slots
    for s in held:
        s.sendall(associate_rq(b"HOLDER"))
        assert read_pdu(s)[0] == 0x02
    assert _answer(node.port, HOSTS[0], associate_rq(b"LIMITED")) == _rj(2, 3, 2)
    for s in held:
        release(s)
    _echo_soon(node.port)
    (row,) = node.wait_for_event("association.rejected", calling_aet="LIMITED")
    assert "local limit exceeded" in row["reason"]

    a_abort = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # from the service user
    for calling, end in ((b"ABORTER", "abort"), (b"CLOSER", "close"), (b"RESETTER", "reset")):
        s = _connect(node.port, HOSTS[1])
        if end == "abort":
            s.sendall(associate_rq(calling) + a_abort)
            s.close()
        elif end == "close":
            s.sendall(associate_rq(calling))
            s.shutdown(socket.SHUT_WR)
            s.close()
        else:
            s.sendall(associate_rq(calling))
            _reset(s)
        _echo_soon(node.port)
        ended = node.wait_for_event("association.aborted", calling_aet=calling.decode()) + \
            node.events("association.released", calling_aet=calling.decode())
        assert len(ended) == 1, (end, ended)


def test_a_burst_of_200_connects_from_20_hosts_is_queued_not_dropped(walk_node):
    """Before: the listen backlog was socketserver's 5; of 200 connections from 20 addresses at
    once, 33 timed out in the kernel's queue. Now every connect completes at once (the per-host
    and waiting limits then refuse the surplus, in the open), and a sender still echoes."""
    import select

    socks, pending = [], {}
    for i in range(200):
        s = socket.socket()
        s.bind((f"127.0.0.{10 + i % 20}", 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", walk_node.port))
        socks.append(s)
        pending[s.fileno()] = s
    deadline = time.monotonic() + 0.9  # under the 1 s of a first SYN retransmission
    failed = 0
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], list(pending.values()), [], max(0.0, deadline - time.monotonic()))
        for s in writable:
            del pending[s.fileno()]
            failed += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    for s in socks:
        s.close()
    assert not pending and not failed, f"{len(pending)} connects still waiting after 0.9 s, {failed} failed"
    _echo_soon(walk_node.port, seconds=5)
