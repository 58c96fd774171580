"""The receiver's connection guard: what a peer may do before and between DIMSE messages.

A new TCP connection stays in its own thread until its whole A-ASSOCIATE-RQ has arrived and
decodes (:mod:`cxr_node.receive.deadlines`), bounded in time however the peer dribbles it, and
only then reaches pynetdicom; connections that close, reset or send malformed requests hold no
association slot; a peer address may hold at most ``max_connections_per_host`` connections; every
PDU's length and delivery time are watched (PDULimit); TLS handshakes run in the connection's
thread with a timeout. Refusals are reported to the Storage SCP (:mod:`cxr_node.receive.scp`),
which audits them.
"""

from __future__ import annotations

import logging
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter
from typing import Any, Callable

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from cxr_node.config import NodeSettings
from cxr_node.logs import PerKeyRate
from cxr_node.receive.associate_check import ABORT_INVALID_PARAMETER, Answer, a_abort, check_associate_rq
from cxr_node.receive.association import AssociationInfo
from cxr_node.receive.deadlines import PDUDeadline, ReplayingAssociationSocket, associate_rq_fault, read_associate_rq
from cxr_node.receive.dimse_guard import GuardedAssociation

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- connections
#
# pynetdicom counts every accepted TCP connection as an association from the moment it is
# accepted until it ends, and a connection that never sends an A-ASSOCIATE-RQ (a port probe, a
# peer that connects and closes, or one that says nothing) ends only after acse_timeout: a burst
# of them uses up max_associations and every real sender is refused "local limit exceeded".
# GuardedServer keeps a new connection in its own thread until its whole A-ASSOCIATE-RQ has
# arrived and decodes (peer_deadlines.py), and only then hands it to pynetdicom: connections that
# close or reset are forgotten at once, malformed requests get an A-ABORT at once, silent or
# dribbling ones are closed after association_request_timeout (network_timeout from the first
# byte), and a peer address may hold at most max_connections_per_host connections. It also
# watches the PDU stream (PDULimit: length, and time per PDU with peer_deadlines.PDUDeadline).

#: Connections the kernel queues for the accept loop (GuardedServer.request_queue_size).
LISTEN_BACKLOG = 1024
#: The largest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ proposing every storage
#: class is about 20 kB).
MAX_CONTROL_PDU = 1 << 20
_P_DATA_TF = 0x04
# A-ABORT PDU (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value)
_A_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


class PDURefused(ConnectionAbortedError):
    """We cut the connection (the reason is the socket's ``violation``); raised from the socket
    read that saw it."""


class PDUTooLarge(PDURefused):
    """A peer sent a PDU longer than we accept; raised from the socket read that saw its header."""


_refused_in_thread = threading.local()


class _ReportedAbortFilter(logging.Filter):
    """For pynetdicom's DUL logger: drops its "Connection closed before the entire PDU was
    received" and traceback for a PDU we refused or a connection we cut (reported once, with the
    reason, by the receiver). Both come from the reading thread right after PDULimit raised there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_refused_in_thread, "active", False):
            return True
        if record.exc_info and isinstance(record.exc_info[1], PDURefused):
            _refused_in_thread.active = False
            return False
        return not record.getMessage().startswith("Connection closed before the entire PDU")


REPORTED_ABORT_FILTER = _ReportedAbortFilter()


class PDULimit:
    """Mixin for an accepted socket: follows the PDU stream (each PDU starts with type, reserved
    and a 4-byte length) and refuses a PDU longer than we accept as soon as its header arrives,
    before a byte of its body is read: it sends an A-ABORT, closes the connection and raises
    PDUTooLarge into the reader (pynetdicom then ends the association as aborted).

    P-DATA-TF PDUs may be ``max_pdu`` long (the Maximum Length we advertise, PS3.8 D.1; 0 = no
    limit), every other PDU ``MAX_CONTROL_PDU``. Peeking reads (MSG_PEEK) are not followed."""

    # class-level defaults: recv runs per 4 kB read (pynetdicom's chunk), so it must stay cheap
    violation: str | None = None
    _following = False
    _left = 0
    _replay = b""
    #: monotonic time the current PDU's first byte arrived (peer_deadlines.PDUDeadline reads it)
    pdu_started = 0.0

    def limit_pdus(self, max_pdu: int, on_violation: Callable[[PDULimit], None] | None = None) -> None:
        self.max_pdu = max_pdu
        self.on_violation = on_violation
        self.violation: str | None = None
        self.association: AssociationInfo | None = None  # set once the association is requested
        self._header = bytearray()
        self._left = 0
        self._following = True

    def replay(self, data: bytes) -> None:
        """Bytes already read from the connection (its A-ASSOCIATE-RQ), to be read again first:
        ``recv`` is shadowed on the instance until they are served, so the per-read path of
        every later read stays as it was."""
        self._replay = bytearray(data)
        self.recv = self._replaying_recv  # type: ignore[method-assign]

    def _replaying_recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = bytes(self._replay[:bufsize])
        del self._replay[:bufsize]
        if not self._replay:
            del self.recv  # back to the class's recv
        if self._following:
            self._follow(data)
        return data

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.violation:
            _refused_in_thread.active = True
            raise PDURefused(self.violation)  # the connection was cut; the reader ends it as aborted
        data = self._raw_recv(bufsize, flags)
        n = len(data)
        if n <= self._left and not flags:  # inside a PDU body: the common case, one comparison
            self._left -= n
        elif n and self._following and not flags & socket.MSG_PEEK:
            self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            if not self._header:
                self.pdu_started = time.monotonic()
            take = min(6 - len(self._header), n - i)
            self._header += data[i:i + take]
            i += take
            if len(self._header) == 6:
                pdu_type, length = self._header[0], int.from_bytes(self._header[2:6], "big")
                self._header.clear()
                limit = self.max_pdu if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
                if limit and length > limit:
                    self._refuse(pdu_type, length, limit)
                self._left = length

    def mid_pdu(self) -> bool:
        """Whether a PDU has begun to arrive and is not complete yet."""
        return bool(self._left or self._header)

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        what = "P-DATA-TF PDU" if pdu_type == _P_DATA_TF else f"PDU of type 0x{pdu_type:02X}"
        self.violation = (f"{what} of {length} bytes is longer than the {limit} bytes we accept"
                          + (" ([node] max_pdu)" if pdu_type == _P_DATA_TF else ""))
        self._abort_and_close(send_abort=True)
        _refused_in_thread.active = True
        raise PDUTooLarge(self.violation)

    def cut(self, reason: str) -> None:
        """End the connection from another thread (the reader is blocked in recv): A-ABORT
        (plain TCP only: an SSL object must not write while another thread reads it), then
        shutdown, which wakes the reader; its next read raises PDURefused."""
        self.violation = reason
        self._abort_and_close(send_abort=not isinstance(self, ssl.SSLSocket))

    def _abort_and_close(self, send_abort: bool) -> None:
        try:
            if send_abort:
                self.sendall(_A_ABORT_INVALID_PARAMETER)  # type: ignore[attr-defined]
            socket.socket.shutdown(self, socket.SHUT_RDWR)  # type: ignore[arg-type]
        except OSError:
            pass  # the peer is gone already; nothing more to tell it
        if self.on_violation:
            self.on_violation(self)


def _stall_timeout(sock: socket.socket, seconds: float) -> None:
    """Cut a connection whose peer stalls for ``seconds``. A plain socket gets the kernel's
    SO_RCVTIMEO / SO_SNDTIMEO and stays in blocking mode: Python's own ``settimeout`` polls before
    every read, and pynetdicom reads 4 kB at a time (bench/recv.py). A read or write that times out
    raises an OSError either way, which pynetdicom handles as a lost connection. TLS sockets keep
    ``settimeout`` (an SSL read must not see a bare EAGAIN)."""
    if isinstance(sock, ssl.SSLSocket) or not hasattr(socket, "SO_RCVTIMEO"):
        sock.settimeout(seconds)
        return
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _LimitedSocket(PDULimit, socket.socket):
    _raw_recv = socket.socket.recv


class LimitedSSLSocket(PDULimit, ssl.SSLSocket):
    _raw_recv = ssl.SSLSocket.recv


class ConnectionGuard:
    """Connection counts per peer address and of connections not yet associated, shared by the
    accept loop and the connection threads; refusals go to ``on_refused(host, port, reason,
    held_back, answer)``, at most once per peer and minute."""

    def __init__(self, node: NodeSettings, on_refused: Callable[[str, int, str, int, bytes | None], None],
                 on_tls_failure: Callable[[str, int, str], None],
                 on_violation: Callable[[PDULimit], None]) -> None:
        self.per_host = node.max_connections_per_host
        self.max_waiting = 4 * node.max_associations
        self.request_timeout = node.association_request_timeout
        self.network_timeout = node.network_timeout
        self.max_pdu = node.max_pdu
        self.on_tls_failure = on_tls_failure
        self.on_violation = on_violation
        self.pdu_deadline = PDUDeadline(node.network_timeout)
        self._on_refused = on_refused
        self._rate = PerKeyRate()
        self._lock = threading.Lock()
        self._by_host: Counter[str] = Counter()
        self._waiting = 0

    def admit(self, host: str) -> str | None:
        """Count a new connection in; the reason it is refused instead."""
        with self._lock:
            if self._by_host[host] >= self.per_host:
                return f"{host} already has {self.per_host} connections open ([node] max_connections_per_host)"
            if self._waiting >= self.max_waiting:
                return (f"{self.max_waiting} connections are already waiting to associate "
                        "(4 x [node] max_associations)")
            self._by_host[host] += 1
            self._waiting += 1
        return None

    def associating(self) -> None:
        with self._lock:
            self._waiting -= 1

    def closed(self, host: str, waiting: bool) -> None:
        with self._lock:
            self._by_host[host] -= 1
            if self._by_host[host] <= 0:
                del self._by_host[host]
            if waiting:
                self._waiting -= 1

    def refused(self, host: str, port: int, reason: str, answer: bytes | None = None) -> None:
        """Report a refusal (at most once per host and minute, counting the ones held back);
        ``answer``: the PDU the peer was sent, if any."""
        held = self._rate.take(host)
        if held is None:
            return
        try:
            self._on_refused(host, port, reason, held, answer)
        except Exception:  # the accept loop must outlive a failed report; the failure is logged
            log.exception("could not report the refused connection from %s:%d", host, port)


class _JoiningRequestHandler(RequestHandler):
    """pynetdicom's handler returns once the association thread has started; this one waits
    for it to end, so that the connection thread (and its count) lasts as long as the
    connection."""

    def _create_association(self):
        self.association = super()._create_association()
        # the A-ASSOCIATE-RQ was read already (GuardedServer); pynetdicom reads it again from memory
        self.association.dul.socket.__class__ = ReplayingAssociationSocket
        self.association.__class__ = GuardedAssociation  # C-STOREs with a bad SOP Class UID get a status
        return self.association

    def handle(self) -> None:
        super().handle()
        self.association.join()
        on_end = getattr(self.server.guard, "on_association_end", None)
        if on_end:
            on_end(self.association)


class GuardedServer(ThreadedAssociationServer):
    """The receiver's server class (``AE.make_server(..., server_class=GuardedServer,
    guard=...)``): per-host connection limit at accept, the A-ASSOCIATE-RQ wait in each
    connection's own thread, PDU length limits, and with TLS the handshake in that thread too
    (pynetdicom's own server handshakes in its accept loop, where one silent peer blocks all)."""

    daemon_threads = True
    block_on_close = False  # service.py drains associations itself, with drain_seconds
    #: The listen backlog (socketserver's default is 5). A burst of connections the accept loop has
    #: not taken yet waits in the kernel's queue; at 5, 33 of 200 connects from 20 hosts timed out
    #: (issue 30) before the per-host limit could say who waits. Linux caps it at net.core.somaxconn.
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)
        self.RequestHandlerClass = _JoiningRequestHandler

    def get_request(self):
        sock, address = self.socket.accept()
        if self.ssl_context:
            sock.settimeout(self.guard.request_timeout)  # for the handshake, in the connection's thread
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        else:
            sock = _LimitedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        if isinstance(sock, PDULimit):
            sock.limit_pdus(self.guard.max_pdu, self.guard.on_violation)
        return sock, address

    def verify_request(self, request, client_address) -> bool:
        host, port = str(client_address[0]), int(client_address[1])
        reason = self.guard.admit(host)
        if reason:
            self.guard.refused(host, port, reason)
            return False
        return True

    def process_request_thread(self, request, client_address) -> None:
        host, port = str(client_address[0]), int(client_address[1])
        accepted_at = time.monotonic()
        waiting = True
        watched = False
        try:
            if isinstance(request, ssl.SSLSocket):
                failure = _tls_handshake(request)
                if failure:
                    self.guard.on_tls_failure(host, port, failure)
                    return
            # the whole A-ASSOCIATE-RQ, here, before pynetdicom counts the connection as an
            # association (peer_deadlines.py): closed, reset, dribbled or malformed requests end here
            pdu, refusal, answer = read_associate_rq(
                request, request._raw_recv, accepted_at, self.guard.request_timeout,
                self.guard.network_timeout, MAX_CONTROL_PDU)
            if pdu is not None:  # each field checked here, then pynetdicom's own decoder (issue 30)
                pdu, verdict = check_associate_rq(pdu)
                if verdict is None and (fault := associate_rq_fault(pdu)):
                    verdict = Answer(a_abort(ABORT_INVALID_PARAMETER), fault)
                if verdict is not None:
                    refusal, answer = verdict.reason, verdict.pdu
            if answer is not None:
                _answer_and_close(request, answer)
            if refusal:
                self.guard.refused(host, port, refusal, answer)
            if pdu is None or refusal:
                return  # refused, or closed by the peer before a whole request (a probe): not refused
            request.replay(pdu)
            self.guard.associating()
            waiting = False
            # pynetdicom leaves accepted sockets blocking without a timeout: a peer that stops in the
            # middle of a PDU would hold its thread (and slot) for ever; and one that dribbles a PDU
            # byte by byte is cut once the PDU has taken network_timeout
            _stall_timeout(request, self.guard.network_timeout)
            self.guard.pdu_deadline.watch(request)
            watched = True
            super().process_request_thread(request, client_address)
        finally:
            if watched:
                self.guard.pdu_deadline.forget(request)
            self.guard.closed(host, waiting)
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """socketserver prints the traceback to stderr; log it instead (one record, escaped)."""
        log.exception("connection from %s:%s ended with an error", client_address[0], client_address[1])

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (running associations carry on).
        pynetdicom's version also unregisters the server from ``AE.start_server``, which did not
        start this one."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def abort_when_a_thread_dies(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` wrapper: when a pynetdicom thread of an association dies on a
    peer's data (a command set without CommandField kills the DUL thread), the peer gets an
    A-ABORT and the connection is closed at once (it waited for a reply until it gave up), and the
    abort is audited with that reason; then the previous hook logs it (logs.py: one line)."""
    assoc = getattr(args.thread, "assoc", args.thread)
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if isinstance(sock, PDULimit) and not sock.violation:
        sock.cut(f"pynetdicom failed on the peer's data: {args.exc_type.__name__}: {str(args.exc_value)[:120]}")
    abort_when_a_thread_dies.previous(args)  # type: ignore[attr-defined]


def _answer_and_close(sock: socket.socket, pdu: bytes, linger: float = 1.0) -> None:
    """Send ``pdu`` (an A-ASSOCIATE-RJ or A-ABORT), then end our side and wait up to ``linger``
    s for the peer to close (PS3.8: the requestor closes after a rejection), reading and dropping
    what it still sends, so that closing with unread data does not reset the connection before the
    answer is read. The connection's thread holds no association slot meanwhile."""
    try:
        sock.sendall(pdu)
        socket.socket.shutdown(sock, socket.SHUT_WR)  # type: ignore[arg-type]
        deadline = time.monotonic() + linger
        raw = getattr(sock, "_raw_recv", None)
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], left)
            if not readable or not (raw(65536) if raw else sock.recv(65536)):
                break
    except (OSError, ValueError):
        pass  # the peer is gone already; nothing more to tell it


def _tls_handshake(sock: ssl.SSLSocket) -> str | None:
    """Do the handshake (with the timeout set at accept); the reason it failed, or None."""
    try:
        sock.do_handshake()
    except (ssl.SSLError, OSError) as e:  # TimeoutError is an OSError
        return "TLS handshake timed out" if isinstance(e, TimeoutError) else \
            f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
    return None
