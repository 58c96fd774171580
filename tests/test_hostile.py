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

