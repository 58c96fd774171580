"""Issue 18, round two of the hostile-peer fuzzing, against the real daemon on real sockets:
association slots held by closed, reset or dribbling connections; acknowledged-but-unreadable
C-STOREs; malformed requests that pynetdicom answered with an abort, a traceback or nothing.

Hostile peers are raw TCP sockets bound to other loopback addresses (127.0.0.2, 127.0.0.3: the
whole of 127/8 is loopback on Linux), so that the daemon sees them as separate hosts and its
per-host limit leaves 127.0.0.1 free for the well-behaved sender (dcmtk, pynetdicom).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from conftest import echoscu
from test_hardening import QUIET, associate_rq, raw_association, read_pdu, release

#: A truncated A-ASSOCIATE-RQ: type 1, length 4, protocol version 1, reserved (issue 18).
TRUNCATED_RQ = bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x00, 0x00])
HOSTS = ("127.0.0.2", "127.0.0.3")


def _connect(port: int, source: str, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _echo_within(port: int, seconds: float) -> float:
    t0 = time.monotonic()
    p = echoscu(port)
    took = time.monotonic() - t0
    assert p.returncode == 0, f"C-ECHO refused after {took:.1f} s: {p.stderr}"
    assert took < seconds, f"C-ECHO took {took:.1f} s"
    return took


# --------------------------------------------------------------------------- 2. slots and drips

def test_truncated_requests_from_two_hosts_free_their_slots_at_once(node_factory):
    """Before: 32 truncated A-ASSOCIATE-RQs (16 from each of two hosts), each answered with an
    A-ABORT and closed, held every association slot for acse_timeout: a third host got "Local
    Limit Exceeded" for 29 s."""
    node = node_factory("truncated", extra=QUIET).start()
    answers = []
    for host in HOSTS:
        for _ in range(16):
            s = _connect(node.port, host)
            try:
                s.sendall(TRUNCATED_RQ)
                try:
                    answers.append(read_pdu(s)[0])
                except (ConnectionError, OSError):
                    answers.append(None)  # closed without an answer
            finally:
                s.close()
    took = _echo_within(node.port, 5)
    print(f"\nC-ECHO from a third host answered in {took:.2f} s after 32 truncated A-ASSOCIATE-RQs")
    assert answers == [0x07] * 32, f"every truncated request gets an A-ABORT at once: {answers}"
    assert not node.events("association.rejected"), "a sender was refused"
    # refused peer events: one log line each (rate-limited per peer), no traceback
    node.stop()
    log = node.log
    assert "Traceback" not in log and "  | " not in log, log[-3000:]
    refused = [ln for ln in log.splitlines() if "A-ASSOCIATE-RQ" in ln and "WARNING" in ln]
    assert 1 <= len(refused) <= 2 * len(HOSTS), refused


def test_resets_in_the_middle_of_a_request_do_not_lock_a_host_out(node_factory):
    """Before: 10 resets in the middle of an A-ASSOCIATE-RQ locked the host out for 30 s."""
    node = node_factory("resets", extra_node="max_connections_per_host = 4", extra=QUIET).start()
    rq = associate_rq(b"RESETTER")
    for _ in range(10):
        s = _connect(node.port, HOSTS[0])
        s.sendall(rq[:len(rq) // 2])
        time.sleep(0.05)  # let the node read the first half
        _reset(s)
    t0 = time.monotonic()
    sock = raw_association(node.port, calling=b"RESETTER", source=HOSTS[0])  # A-ASSOCIATE-AC expected
    took = time.monotonic() - t0
    release(sock)
    assert took < 5, f"associated after {took:.1f} s"
    # and resets in the middle of a P-DATA PDU, after the association
    for _ in range(10):
        s = raw_association(node.port, calling=b"RESETTER", source=HOSTS[0])
        s.sendall(bytes([0x04, 0]) + (1000).to_bytes(4, "big") + bytes(10))
        time.sleep(0.05)
        _reset(s)
    release(raw_association(node.port, calling=b"RESETTER", source=HOSTS[0]))
    _echo_within(node.port, 5)


def _drip(port: int, source: str, data: bytes, interval: float, stop: threading.Event,
          result: dict, prefix: bytes = b"") -> None:
    """Send ``data`` one byte per ``interval`` s; record when the node cut the connection."""
    try:
        s = _connect(port, source, timeout=30)
    except OSError as e:
        result["error"] = f"connect: {e}"
        return
    try:
        if prefix:
            s.sendall(prefix)
            assert read_pdu(s)[0] == 0x02
        t0 = time.monotonic()
        for b in data:
            if stop.is_set():
                return
            s.sendall(bytes([b]))
            stop.wait(interval)
            s.setblocking(False)
            try:
                if s.recv(4096) == b"":
                    result["cut_after"] = time.monotonic() - t0
                    return
            except BlockingIOError:
                pass
            except OSError:
                result["cut_after"] = time.monotonic() - t0
                return
            finally:
                s.setblocking(True)
        result["completed"] = time.monotonic() - t0
    except OSError:
        result["cut_after"] = time.monotonic() - t0
    finally:
        s.close()


def test_a_peer_dribbling_one_byte_per_second_is_cut_within_network_timeout(node_factory):
    """Before: the request timeout covered only the first byte; a 1-byte-per-second A-ASSOCIATE-RQ
    (or P-DATA PDU) was never cut, and 16 such drips blocked every sender for as long as they
    lasted."""
    node = node_factory("drip", extra_node="network_timeout = 4\nassociation_request_timeout = 30",
                        extra=QUIET).start()
    stop = threading.Event()
    rq = associate_rq(b"DRIPPER")
    pdata = bytes([0x04, 0]) + (200).to_bytes(4, "big") + bytes(200)
    results: list[dict] = []
    threads = []
    for i in range(16):  # 8 per host: the per-host limit
        r: dict = {}
        results.append(r)
        host = HOSTS[i % 2]
        if i < 14:
            args = (node.port, host, rq, 0.5, stop, r)
        else:  # two drip a P-DATA PDU after a valid association
            args = (node.port, host, pdata, 0.5, stop, r, associate_rq(b"DRIPPER"))
        threads.append(threading.Thread(target=_drip, args=args, daemon=True))
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        _echo_within(node.port, 5)  # the drips hold no association slot meanwhile
        for t in threads:
            t.join(timeout=20)
    finally:
        stop.set()
    for r in results:
        assert "cut_after" in r, f"a dribbling peer was not cut: {r}"
        assert r["cut_after"] < 4 + 1.5, f"cut after {r['cut_after']:.1f} s, network_timeout is 4 s"
    print(f"\n16 dribbling peers cut after {min(r['cut_after'] for r in results):.1f}"
          f"-{max(r['cut_after'] for r in results):.1f} s (network_timeout 4 s)")
    rows = node.wait_for_event("association.aborted", calling_aet="DRIPPER")
    assert any("network_timeout" in (row["reason"] or "") for row in rows), rows
    _echo_within(node.port, 5)


# --------------------------------------------------------------------------- 3. unreadable files

CR = "1.2.840.10008.5.1.4.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT, EXPLICIT, JPEG_BASELINE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"


def _uid_item(item_type: int, value: str) -> bytes:
    from test_hardening import _item

    return _item(item_type, value.encode())


def _associate(port: int, abstract: str, ts: str, calling: bytes = b"RAWSTORE") -> socket.socket:
    """A raw association proposing one presentation context (ID 1) and checking it was accepted."""
    from test_hardening import _item

    app = _uid_item(0x10, "1.2.840.10008.3.1.1.1")
    pc = _item(0x20, bytes([1, 0, 0, 0]) + _uid_item(0x30, abstract) + _uid_item(0x40, ts))
    user = _item(0x50, _item(0x51, (16384).to_bytes(4, "big")) + _uid_item(0x52, "1.2.826.0.1.3680043.10.1394.9"))
    body = (1).to_bytes(2, "big") + b"\0\0" + b"CXRNODE".ljust(16) + calling.ljust(16) + bytes(32) + app + pc + user
    sock = _connect(port, "127.0.0.1", timeout=30)
    sock.sendall(bytes([0x01, 0]) + len(body).to_bytes(4, "big") + body)
    pdu_type, ac = read_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted: PDU 0x{pdu_type:02X}"
    i = 68  # after the fixed fields: find the presentation context item (0x21) and its result
    while i < len(ac):
        item_type, item_len = ac[i], int.from_bytes(ac[i + 2:i + 4], "big")
        if item_type == 0x21:
            assert ac[i + 6] == 0, f"presentation context refused (result {ac[i + 6]})"
        i += 4 + item_len
    return sock


def _command(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1, E.1)."""
    def elem(tag: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0"
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value

    body = (elem(0x00000002, sop_class.encode()) + elem(0x00000100, struct.pack("<H", 0x0001))
            + elem(0x00000110, struct.pack("<H", 7)) + elem(0x00000700, struct.pack("<H", 0))
            + elem(0x00000800, struct.pack("<H", 0x0000)) + elem(0x00001000, sop_instance.encode()))
    return elem(0x00000000, struct.pack("<L", len(body))) + body


def _pdata(context_id: int, control: int, data: bytes) -> bytes:
    pdv = (len(data) + 2).to_bytes(4, "big") + bytes([context_id, control]) + data
    return bytes([0x04, 0]) + len(pdv).to_bytes(4, "big") + pdv


def raw_store(port: int, abstract: str, ts: str, dataset: bytes, sop_class: str, sop_instance: str,
              calling: bytes = b"RAWSTORE") -> tuple[int, str]:
    """C-STORE ``dataset`` (bytes as given) on a context of ``abstract``/``ts``; (status, comment)."""
    sock = _associate(port, abstract, ts, calling)
    try:
        sock.sendall(_pdata(1, 0x03, _command(sop_class, sop_instance)))
        for i in range(0, len(dataset), 16000):
            last = i + 16000 >= len(dataset)
            sock.sendall(_pdata(1, 0x02 if last else 0x00, dataset[i:i + 16000]))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04, f"expected a C-STORE-RSP, got PDU 0x{pdu_type:02X} {body[:16].hex()}"
        cmd = body[6:]
        at = cmd.index(b"\x00\x00\x00\x09\x02\x00\x00\x00")  # (0000,0900) Status, length 2
        status = struct.unpack_from("<H", cmd, at + 8)[0]
        comment = ""
        if b"\x00\x00\x02\x09" in cmd:  # (0000,0902) Error Comment
            at = cmd.index(b"\x00\x00\x02\x09")
            n = struct.unpack_from("<L", cmd, at + 4)[0]
            comment = cmd[at + 8:at + 8 + n].decode().strip("\0 ")
        release(sock)
        return status, comment
    finally:
        sock.close()


def _encoded(path, implicit: bool) -> tuple[bytes, str, str]:
    """The dataset bytes of a file re-encoded in Implicit or Explicit VR LE; SOP Class and Instance."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = dcmread(path)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, ds)
    return buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def _dcmdump_ok(path) -> None:
    import subprocess

    from conftest import require_tool

    p = subprocess.run([require_tool("dcmdump", "dcmtk"), "-q", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "E:" not in p.stderr, f"dcmdump cannot read {path}: {p.stderr[:500]}"


def test_success_only_for_a_dataset_that_parses_in_the_negotiated_syntax(node_factory, tmp_path):
    """Before: each of these got 0x0000 and dcmdump could not read the stored file."""
    from dicomgen import make_cr, uid

    node = node_factory("integrity", extra=QUIET).start()
    cases = []  # (what, abstract syntax, transfer syntax, dataset bytes, command SOP class, status, reason)
    for name, (abstract, ts, implicit, want, reason) in {
        "explicit on implicit": (CR, IMPLICIT, False, 0xC000, "Explicit VR data on an Implicit VR context"),
        "implicit on explicit": (CR, EXPLICIT, True, 0xC000, "not Explicit VR"),
        "native pixels on JPEG baseline": (CR, JPEG_BASELINE, False, 0xC000, "Pixel Data is not encapsulated"),
        "CR on the Verification context": (VERIFICATION, IMPLICIT, True, 0x0122, "not the presentation context's"),
    }.items():
        data, sop_class, sop = _encoded(make_cr(tmp_path / f"{len(cases)}.dcm", sop_uid=uid(), rows=64, cols=64),
                                        implicit)
        cases.append((name, abstract, ts, data, sop_class, sop, want, reason))
    for name, abstract, ts, data, sop_class, sop, want, reason in cases:
        status, comment = raw_store(node.port, abstract, ts, data, sop_class, sop)
        assert (status, reason in comment) == (want, True), f"{name}: 0x{status:04X} {comment!r}"
        (row,) = node.wait_for_event("instance.failed", sop_instance_uid=sop)
        assert row["status"] == want and reason in row["reason"], (name, row)
    assert not [p for p in node.spool_files() if p.is_file()], "a refused instance left a file"
    assert not [p for p in (node.data_dir / "incoming").rglob("*") if p.is_file()], "a temp file was left"

    # the right encodings are stored, and the stored files open in dcmtk
    for implicit, ts in ((True, IMPLICIT), (False, EXPLICIT)):
        data, sop_class, sop = _encoded(make_cr(tmp_path / f"ok-{ts}.dcm", sop_uid=uid(), rows=64, cols=64), implicit)
        assert raw_store(node.port, CR, ts, data, sop_class, sop) == (0x0000, "")
        (row,) = node.wait_for_event("instance.stored", sop_instance_uid=sop)
        _dcmdump_ok(node.data_dir / "spool" / row["path"] if row.get("path") else
                    next(p for p in node.spool_files() if p.name == f"{sop}.dcm"))


def test_encoding_check_on_real_files():
    """dataset_check walks pydicom-data's real films in their own syntax and refuses them in the
    wrong one: Explicit for Implicit and the reverse, native pixels for JPEG and the reverse, and a
    cut-off file; under a millisecond for a 7 MB film."""
    from io import BytesIO

    from pydicom.data import get_testdata_file
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from cxr_node.receive.dataset_check import encoding_fault

    def split(name):
        raw = open(get_testdata_file(name), "rb").read()
        f = BytesIO(raw)
        read_preamble(f, False)
        ts = str(_read_file_meta_info(f).TransferSyntaxUID)
        return raw[f.tell():], ts

    explicit, ts = split("RG1_UNCR.dcm")
    assert ts == EXPLICIT and encoding_fault(explicit, EXPLICIT) is None
    implicit = _encoded(get_testdata_file("RG1_UNCR.dcm"), True)[0]
    assert encoding_fault(implicit, IMPLICIT) is None
    assert "not Explicit VR" in encoding_fault(implicit, EXPLICIT)
    assert "Explicit VR data on an Implicit VR context" in encoding_fault(explicit, IMPLICIT)
    assert "Pixel Data is not encapsulated" in encoding_fault(explicit, JPEG_BASELINE)
    jpeg, ts = split("SC_rgb_jpeg_dcmtk.dcm")
    assert ts == JPEG_BASELINE and encoding_fault(jpeg, ts) is None
    assert "Pixel Data is encapsulated" in encoding_fault(jpeg, EXPLICIT)
    assert encoding_fault(jpeg[:-100], ts).startswith("truncated")
    assert encoding_fault(explicit[:-1], EXPLICIT).startswith("truncated")
    t0 = time.perf_counter()
    for _ in range(10):
        encoding_fault(explicit, EXPLICIT)
    per_call = (time.perf_counter() - t0) / 10
    assert per_call < 0.005, f"{per_call * 1e3:.1f} ms for a {len(explicit) >> 20} MB film"


# --------------------------------------------------------------------------- 4. smaller ones

def test_invalid_affected_sop_class_uid_gets_c000_not_an_abort(node_factory, tmp_path):
    """Before: `1.2.3.` and `1.2.3\\4` as the C-STORE request's Affected SOP Class UID aborted the
    association (pynetdicom found no service class for it)."""
    from dicomgen import make_cr, uid

    node = node_factory("badclass", extra=QUIET).start()
    for bad, why in (("1.2.3.", "UID invalid (6 chars)"), ("1.2.3\\4", "UID invalid (2 values)")):
        data, _, sop = _encoded(make_cr(tmp_path / "cr.dcm", sop_uid=uid(), rows=32, cols=32), False)
        status, comment = raw_store(node.port, CR, EXPLICIT, data, bad, sop, calling=b"BADCLASS")
        assert status == 0xC000 and why in comment, (bad, hex(status), comment)
        (row,) = node.wait_for_event("instance.failed", sop_instance_uid=sop)
        assert row["status"] == 0xC000 and why in row["reason"]
    assert len(node.wait_for_event("association.released", calling_aet="BADCLASS")) == 2
    assert not node.events("association.aborted"), "an association was aborted"
