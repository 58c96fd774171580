"""Cost of following the PDU stream on every read (the receiver's PDU-length guard).

    .venv/bin/python bench/recv.py [--mb 400] [--rounds 3]

A sender thread writes P-DATA-TF-shaped PDUs (16 kB) into a socket pair; the reader reads them in
4096-byte ``recv`` calls, as pynetdicom does, from a plain socket (the reference, in the same go)
and from the guarded socket cxr-node's receiver uses (``cxr_node.receive._LimitedSocket``),
without and with the accepted connection's stall timeout (SO_RCVTIMEO, as the receiver sets it). Prints MB/s and the ratio to the plain socket.
Both threads share one interpreter, so the figure shows the Python-level cost per read, which
the daemon's receiving threads pay the same way.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_node.receive.scp import _LimitedSocket, _stall_timeout  # noqa: E402

PDU = 16384


def _send(sock: socket.socket, total: int) -> None:
    pdu = bytes([4, 0]) + (PDU - 6).to_bytes(4, "big") + b"\0" * (PDU - 6)
    sent = 0
    while sent < total:
        sock.sendall(pdu)
        sent += len(pdu)
    sock.close()


def once(kind: str, total: int) -> float:
    a, b = socket.socketpair()
    if kind != "plain socket":
        b = _LimitedSocket(b.family, b.type, b.proto, fileno=b.detach())
        b.limit_pdus(4 * PDU)
        if kind.endswith("timeout"):
            _stall_timeout(b, 30)
    t = threading.Thread(target=_send, args=(a, total))
    t.start()
    t0, n = time.perf_counter(), 0
    while True:
        d = b.recv(4096)
        if not d:
            break
        n += len(d)
    dt = time.perf_counter() - t0
    t.join()
    b.close()
    return n / dt / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    kinds = ("plain socket", "guarded", "guarded + timeout")
    res = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            res[k].append(once(k, args.mb * 2**20))
    ref = statistics.median(res["plain socket"])
    for k in kinds:
        m = statistics.median(res[k])
        print(f"{k:>18}: {m:7.0f} MB/s  ratio to plain {m / ref:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
