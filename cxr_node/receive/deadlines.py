"""Time bounds on what a DICOM peer sends, for the receiver's connection threads (issue 18).

pynetdicom counts a connection as an association from the moment it starts reading its
A-ASSOCIATE-RQ until ``acse_timeout``: a request that is truncated, malformed, reset or closed
half-way leaves its association thread waiting for a primitive that never comes, and holds a slot
(32 truncated requests locked every sender out for 29 s). And its only stall bound is per read,
so a peer that dribbles one byte per second is never cut.

So the receiver reads each connection's whole A-ASSOCIATE-RQ itself, in the connection's own
thread, within a deadline, and decodes it with pynetdicom's own decoder before pynetdicom sees
it (:func:`read_associate_rq`): closed, reset, dribbled or malformed requests end there and never
take a slot; a valid one is replayed to pynetdicom from memory (:class:`ReplayingAssociationSocket`).
Once associated, :class:`PDUDeadline` (one thread for the whole receiver) cuts a connection whose
current PDU has been arriving for longer than ``[node] network_timeout``, however slowly it
drips; the socket's PDU follower (``receive.PDULimit``) stamps when each PDU began, once per PDU,
so the per-read hot path is unchanged.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ_TYPE = 0x01


def read_associate_rq(sock: socket.socket, raw_recv: Callable[[int], bytes], accepted_at: float,
                      request_timeout: float, network_timeout: float, max_length: int
                      ) -> tuple[bytes | None, str, bytes | None]:
    """Read one whole A-ASSOCIATE-RQ PDU from ``sock`` (through ``raw_recv``, which bypasses any
    PDU follower). It must be complete ``request_timeout`` s after ``accepted_at`` and
    ``network_timeout`` s after its first byte, whichever comes first.

    Returns ``(pdu, "", None)``, or ``(None, reason, answer)``: ``reason`` is "" when the peer
    closed or reset the connection (nothing to refuse), otherwise why the connection is refused;
    ``answer`` is the PDU to send the peer first (an A-ABORT for a connection that does not start
    with an A-ASSOCIATE-RQ), or None."""
    from cxr_node.receive.associate_check import first_byte_answer

    deadline = accepted_at + request_timeout
    why = f"no complete A-ASSOCIATE-RQ within {request_timeout:g} s ([node] association_request_timeout)"
    buf = bytearray()
    need = 6
    tls = isinstance(sock, ssl.SSLSocket)
    while len(buf) < need:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, why + (f"; {len(buf)} of {need} bytes arrived" if buf else ""), None
        try:
            if tls:
                if not sock.pending():
                    sock.settimeout(left)
            else:
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    continue  # the deadline check above ends it
            chunk = raw_recv(min(need - len(buf), 65536))
        except TimeoutError:
            continue
        except (OSError, ValueError):  # reset, or closed under us
            log.debug("connection reset after %d bytes of an A-ASSOCIATE-RQ", len(buf))
            return None, "", None
        if not chunk:
            log.debug("connection closed after %d bytes of an A-ASSOCIATE-RQ", len(buf))
            return None, "", None
        if not buf:
            if chunk[0] != A_ASSOCIATE_RQ_TYPE:
                answer = first_byte_answer(chunk[0])
                return None, answer.reason, answer.pdu
            first_byte_deadline = time.monotonic() + network_timeout
            if first_byte_deadline < deadline:
                deadline = first_byte_deadline
                why = f"A-ASSOCIATE-RQ not complete within {network_timeout:g} s of its first byte " \
                      "([node] network_timeout)"
        buf += chunk
        if need == 6 and len(buf) >= 6:
            length = int.from_bytes(buf[2:6], "big")
            if length > max_length:
                return (None, f"A-ASSOCIATE-RQ of {length} bytes is longer than the {max_length} bytes we accept",
                        bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06]))
            need = 6 + length
    return bytes(buf), "", None


def associate_rq_fault(pdu: bytes) -> str | None:
    """Why pynetdicom could not take this A-ASSOCIATE-RQ (its own decoder and conversion to the
    A-ASSOCIATE primitive, as its DUL and ACSE would run them), or None."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    from cxr_node.logs import quiet_libraries

    try:
        with quiet_libraries():  # the caller reports the fault in one line; pynetdicom would add its own
            rq = A_ASSOCIATE_RQ()
            rq.decode(pdu)
            rq.to_primitive()
    except Exception as e:
        return f"malformed A-ASSOCIATE-RQ: {type(e).__name__}: {str(e)[:200]}"
    return None


class ReplayingAssociationSocket(AssociationSocket):
    """pynetdicom's transport socket for a connection whose A-ASSOCIATE-RQ we have read already:
    reports data ready while the replayed bytes last (``select`` cannot see them)."""

    @property
    def ready(self) -> bool:
        if getattr(self.socket, "_replay", None):
            return True
        return AssociationSocket.ready.fget(self)  # type: ignore[attr-defined]


class PDUDeadline:
    """Cuts an associated connection whose current PDU has been arriving for more than
    ``seconds``. Sockets are ``receive.PDULimit`` instances: ``pdu_started`` (monotonic time the
    current PDU's first byte arrived), ``mid_pdu()`` and ``cut(reason)``."""

    def __init__(self, seconds: float, interval: float | None = None) -> None:
        self.seconds = seconds
        self.interval = interval or min(0.5, seconds / 8)
        self._socks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, sock: Any) -> None:
        with self._lock:
            self._socks.add(sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cxr-node-pdu-deadline", daemon=True)
                self._thread.start()

    def forget(self, sock: Any) -> None:
        with self._lock:
            self._socks.discard(sock)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            now = time.monotonic()
            with self._lock:
                socks = list(self._socks)
            for s in socks:
                if s.mid_pdu() and now - s.pdu_started >= self.seconds:
                    self.forget(s)
                    try:
                        s.cut(f"PDU not complete within {self.seconds:g} s of its first byte "
                              "([node] network_timeout)")
                    except Exception:  # one failed cut must not stop the watch over the others
                        log.exception("could not cut a stalled connection")
