"""The Storage SCP: AE, presentation contexts, allow-lists, connection limits, and the C-STORE
handler with its DIMSE status mapping.

The C-STORE handler takes the bytes exactly as received and hands them to ``ingest.py``, which
checks the UIDs and makes the instance durable (spool + database); only then does it answer
Success. It never waits on later stages: study completion is a scheduler job that reads the
database.

DIMSE statuses (PS3.4 Annex B.2.3, PS3.7 C.4.2):
  0x0000 success, also for a repeated SOP Instance UID (stored once, audited as duplicate)
  0xA700 out of resources: disk full, write error, database unavailable
  0xA900 dataset does not match SOP class: SOP Class/Instance UID differ from the request
  0xC000 cannot understand: does not decode, or not in the negotiated transfer syntax (Explicit VR
         data on an Implicit VR context, native pixels on a JPEG one: dataset_check.py), lacks or
         has malformed Study/Series/SOP UIDs
  0x0122 SOP class not supported: the request's SOP Class is not the presentation context's
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
import uuid
import weakref
from collections import Counter
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from cxr_node.dicom import status as dimse
from cxr_node.config import NodeSettings, Settings
from cxr_node.receive.dataset_check import encoding_fault
from cxr_node.receive.dimse_guard import GuardedAssociation, bad_sop_class, note_command_set
from cxr_node.errors import InvalidInstanceError, SOPClassMismatchError, SpoolError, db_error_text
from cxr_node.dicom.uids import is_valid_uid
from cxr_node.receive.deadlines import PDUDeadline, ReplayingAssociationSocket, associate_rq_fault, read_associate_rq
from cxr_node.receive.association import AssociationInfo
from cxr_node.receive.ingest import STATUS_SUCCESS, Header, Ingest, read_header

log = logging.getLogger(__name__)

STATUS_OUT_OF_RESOURCES = dimse.OUT_OF_RESOURCES      # the table: cxr_node.dicom.status
STATUS_SOP_CLASS_MISMATCH = dimse.DATASET_MISMATCH
STATUS_CANNOT_UNDERSTAND = dimse.CANNOT_UNDERSTAND
#: PS3.7 C.5.x "Refused: SOP Class not supported": the request's SOP Class is not the abstract
#: syntax of the presentation context it came on (a CR C-STORE on the Verification context)
STATUS_SOP_CLASS_NOT_SUPPORTED = dimse.SOP_CLASS_NOT_SUPPORTED

#: Explicit VR Little Endian first: pynetdicom accepts the first syntax in *our* list that the
#: requestor proposed, and its own list starts with Implicit. Then Implicit, then what pydicom +
#: pylibjpeg can decode.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLED_AET = (0x01, 0x01, 0x07)   # permanent, service-user, called AE title not recognised
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
REJECT_HOST = (0x01, 0x01, 0x01)         # permanent, service-user, no reason given


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


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

#: The largest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ proposing every storage
#: class is about 20 kB).
MAX_CONTROL_PDU = 1 << 20
_P_DATA_TF = 0x04
_A_ASSOCIATE_RQ = 0x01
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


_REPORTED_ABORT_FILTER = _ReportedAbortFilter()


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
        """Bytes already read from the connection (its A-ASSOCIATE-RQ), to be read again first."""
        self._replay = bytearray(data)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.violation:
            _refused_in_thread.active = True
            raise PDURefused(self.violation)  # the connection was cut; the reader ends it as aborted
        if self._replay:
            data = bytes(self._replay[:bufsize])
            del self._replay[:bufsize]
        else:
            data = self._raw_recv(bufsize, flags)
            if not data and self.violation:  # cut from another thread (PDUDeadline) while we waited
                _refused_in_thread.active = True
                raise PDURefused(self.violation)
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


class _LimitedSSLSocket(PDULimit, ssl.SSLSocket):
    _raw_recv = ssl.SSLSocket.recv


class _PerPeerRate:
    """At most one event per peer address and ``interval`` seconds; counts the ones held back."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, host: str) -> int | None:
        """The number of events held back since the last one let through, or None to hold this one."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(host, -self.interval) < self.interval:
                self._held[host] += 1
                return None
            if len(self._last) > 10000:  # forget quiet peers so a scan of many addresses cannot grow this
                for h in [h for h, t in self._last.items() if now - t >= self.interval]:
                    del self._last[h]
                    self._held.pop(h, None)
            self._last[host] = now
            return self._held.pop(host, 0)


class ConnectionGuard:
    """Connection counts per peer address and of connections not yet associated, shared by the
    accept loop and the connection threads; refusals go to ``on_refused(host, port, reason,
    held_back)``, at most once per peer and minute."""

    def __init__(self, node: NodeSettings, on_refused: Callable[[str, int, str, int], None],
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
        self._rate = _PerPeerRate()
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

    def refused(self, host: str, port: int, reason: str) -> None:
        held = self._rate.take(host)
        if held is None:
            return
        try:
            self._on_refused(host, port, reason, held)
        except Exception:  # the accept loop must outlive a failed report; the failure is logged
            log.exception("could not report the refused connection from %s:%d", host, port)


class _JoiningRequestHandler(RequestHandler):
    """pynetdicom's handler returns once the association thread has started; this one waits
    for it to end, so that the connection thread (and its count) lasts as long as the
    connection."""

    def _create_association(self):  # noqa: ANN202
        self.association = super()._create_association()
        # the A-ASSOCIATE-RQ was read already (GuardedServer); pynetdicom reads it again from memory
        self.association.dul.socket.__class__ = ReplayingAssociationSocket
        self.association.__class__ = GuardedAssociation  # C-STOREs with a bad SOP Class UID get a status
        return self.association

    def handle(self) -> None:
        super().handle()
        self.association.join()


class GuardedServer(ThreadedAssociationServer):
    """The receiver's server class (``AE.make_server(..., server_class=GuardedServer,
    guard=...)``): per-host connection limit at accept, the A-ASSOCIATE-RQ wait in each
    connection's own thread, PDU length limits, and with TLS the handshake in that thread too
    (pynetdicom's own server handshakes in its accept loop, where one silent peer blocks all)."""

    daemon_threads = True
    block_on_close = False  # service.py drains associations itself, with drain_seconds

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)
        self.RequestHandlerClass = _JoiningRequestHandler

    def get_request(self):  # noqa: ANN201
        sock, address = self.socket.accept()
        if self.ssl_context:
            sock.settimeout(self.guard.request_timeout)  # for the handshake, in the connection's thread
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        else:
            sock = _LimitedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        if isinstance(sock, PDULimit):
            sock.limit_pdus(self.guard.max_pdu, self.guard.on_violation)
        return sock, address

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001
        host, port = str(client_address[0]), int(client_address[1])
        reason = self.guard.admit(host)
        if reason:
            self.guard.refused(host, port, reason)
            return False
        return True

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
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
            pdu, refusal = read_associate_rq(
                request, request._raw_recv, accepted_at, self.guard.request_timeout,
                self.guard.network_timeout, MAX_CONTROL_PDU)
            if pdu is not None:
                refusal = associate_rq_fault(pdu) or ""
                if refusal:
                    _send_abort(request)
            if refusal:
                self.guard.refused(host, port, refusal)
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

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        """socketserver prints the traceback to stderr; log it instead (one record, escaped)."""
        log.exception("connection from %s:%s ended with an error", client_address[0], client_address[1])

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (running associations carry on).
        pynetdicom's version also unregisters the server from ``AE.start_server``, which did not
        start this one."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _send_abort(sock: socket.socket) -> None:
    """A-ABORT (service provider, invalid PDU parameter value) for a request we refuse."""
    try:
        sock.sendall(_A_ABORT_INVALID_PARAMETER)
    except OSError:
        pass  # the peer is gone already; nothing more to tell it


def _tls_handshake(sock: ssl.SSLSocket) -> str | None:
    """Do the handshake (with the timeout set at accept); the reason it failed, or None."""
    try:
        sock.do_handshake()
    except (ssl.SSLError, OSError) as e:  # TimeoutError is an OSError
        return "TLS handshake timed out" if isinstance(e, TimeoutError) else \
            f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
    return None


def _syntax_name(transfer_syntax: str) -> str:
    return UID(transfer_syntax).name


def _any_uid(value: Any) -> tuple[bool, str]:
    """For pynetdicom's ``_config.VALIDATORS["UI"]``: accept every UID a peer sends; the handlers
    check the ones they use (``spool.is_valid_uid``) and answer with a status."""
    return True, ""


class Receiver:
    """The pynetdicom AE plus the handlers bound to it. Dependencies come in through the
    constructor and the handler registration tuples, never globals."""

    def __init__(self, settings: Settings, ingest: Ingest, metrics=None) -> None:  # noqa: ANN001
        self.settings = settings
        self.ingest = ingest
        self.metrics = metrics
        self._assocs: weakref.WeakKeyDictionary[Any, AssociationInfo] = weakref.WeakKeyDictionary()
        #: Called with the association id once a peer has released an association that stored
        #: something (the scheduler's release rule for study completion); set by service.py.
        self.on_released: Callable[[str], None] | None = None
        self.ae = self._build_ae()
        self.server = None

    def _build_ae(self) -> AE:
        n = self.settings.node
        ae = AE(ae_title=n.ae_title)
        ae.maximum_pdu_size = n.max_pdu
        ae.maximum_associations = n.max_associations
        ae.network_timeout = n.network_timeout
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.require_called_aet = False  # checked in _on_requested so that the rejection is audited
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def bind(self) -> GuardedServer:
        """Listen on [node] host:port (raises OSError if it cannot); connections wait in the
        backlog until :meth:`serve`. Separate so that ``serve`` can hold the port before it
        sweeps or recovers anything."""
        from pynetdicom import _config

        from cxr_node.dicom.tls import server_context

        n = self.settings.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_DIMSE_RECV, note_command_set),
        ]
        # A malformed UID in a request (an 80-character SOP Instance UID) fails pynetdicom's check
        # while the DIMSE message is decoded, which aborts the association before any handler runs;
        # let it through to _on_store, which answers 0xC000 and says why (process-wide setting)
        _config.VALIDATORS["UI"] = _any_uid
        # pynetdicom's standard handlers only format debug lines (its loggers are held at WARNING,
        # logs.py), per PDU and DIMSE message, and on hostile input they raise (an Affected SOP
        # Class UID of two values): their traceback went to the log, and the exception stopped the
        # handlers bound after them (note_command_set) from running
        _config.LOG_HANDLER_LEVEL = "none"
        dul_log = logging.getLogger("pynetdicom.dul")
        if _REPORTED_ABORT_FILTER not in dul_log.filters:
            dul_log.addFilter(_REPORTED_ABORT_FILTER)
        ctx = server_context(self.settings.tls)
        if ctx is not None:
            ctx.sslsocket_class = _LimitedSSLSocket
        guard = ConnectionGuard(n, self._on_refused, self._on_tls_failure, self._on_violation)
        self.server = self.ae.make_server((n.host, n.port), evt_handlers=handlers, ssl_context=ctx,
                                          server_class=GuardedServer, guard=guard)
        return self.server

    def serve(self) -> None:
        """Start accepting connections (in a daemon thread)."""
        threading.Thread(target=self.server.serve_forever, name="cxr-node-acceptor", daemon=True).start()

    def _on_tls_failure(self, host: str, port: int, reason: str) -> None:
        log.warning("TLS connection from %s:%d refused: %s", host, port, reason)
        self._audit("association.rejected", "failure", host=host, port=port, reason=reason,
                    detail={"stage": "tls"})

    def _on_refused(self, host: str, port: int, reason: str, held_back: int) -> None:
        more = f" ({held_back} more from this host since the last report)" if held_back else ""
        log.warning("connection from %s:%d closed: %s%s", host, port, reason, more)
        self._audit("connection.refused", "failure", host=host, port=port, reason=reason,
                    detail={"held_back_since_last_row": held_back, "rate_limit": "one row per host and minute"})

    def _on_violation(self, sock: PDULimit) -> None:
        info = sock.association
        if info is not None:
            info.abort_reason = sock.violation  # logged and audited with the association's counts in _on_aborted
            return
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            host, port = "?", 0
        log.warning("connection from %s:%s aborted: %s", host, port, sock.violation)
        self._audit("association.aborted", "failure", host=str(host), port=int(port), reason=sock.violation)

    # ------------------------------------------------------------------ association events

    def _audit(self, event: str, outcome: str = "success", **fields: Any) -> None:
        self.ingest.audit(event, outcome, **fields)

    def _on_requested(self, event) -> None:  # noqa: ANN001
        assoc = event.assoc
        rq = assoc.requestor
        info = AssociationInfo(id=str(uuid.uuid4()), calling_aet=str(rq.primitive.calling_ae_title).strip(),
                               called_aet=str(rq.primitive.called_ae_title).strip(),
                               host=str(rq.address), port=int(rq.port))
        self._assocs[assoc] = info
        sock = getattr(assoc.dul.socket, "socket", None)
        if isinstance(sock, PDULimit):
            sock.association = info
        self._audit("association.opened", **info.fields())
        reason = self._refusal(info)
        if reason:
            rsd, text = reason
            info.rejected = True
            assoc.acse.send_reject(*rsd)
            assoc.kill()  # wait until the DUL has sent the A-ASSOCIATE-RJ (as pynetdicom's own rejections do)
            if self.metrics:
                self.metrics.associations.labels("rejected").inc()
            self._audit("association.rejected", "failure", reason=text,
                        detail={"result": rsd[0], "source": rsd[1], "diagnostic": rsd[2]}, **info.fields())
            log.warning("rejected association %s from %s@%s:%d: %s", info.id, info.calling_aet, info.host,
                        info.port, text)

    def _refusal(self, info: AssociationInfo) -> tuple[tuple[int, int, int], str] | None:
        import ipaddress

        n = self.settings.node
        if info.called_aet != n.ae_title:
            return REJECT_CALLED_AET, f"called AE title {info.called_aet!r} is not {n.ae_title!r}"
        if n.allowed_calling_aets and info.calling_aet not in n.allowed_calling_aets:
            return REJECT_CALLING_AET, f"calling AE title {info.calling_aet!r} is not in allowed_calling_aets"
        if n.allowed_hosts:
            try:
                addr = ipaddress.ip_address(info.host)
            except ValueError:
                return REJECT_HOST, f"peer address {info.host!r} is not an IP address"
            if addr.version == 6 and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if not any(addr in net for net in n.allowed_hosts if net.version == addr.version):
                return REJECT_HOST, f"host {info.host} is not in allowed_hosts"
        return None

    def _info(self, assoc) -> AssociationInfo | None:  # noqa: ANN001
        return self._assocs.get(assoc)

    def _on_accepted(self, event) -> None:  # noqa: ANN001
        info = self._info(event.assoc)
        if info:
            accepted = [cx.abstract_syntax for cx in event.assoc.accepted_contexts]
            self._audit("association.accepted", detail={"accepted_contexts": len(accepted)}, **info.fields())
            if self.metrics:
                self.metrics.associations.labels("accepted").inc()
            log.info("association %s from %s@%s:%d accepted", info.id, info.calling_aet, info.host, info.port)

    def _on_rejected(self, event) -> None:  # noqa: ANN001
        """pynetdicom's own rejections (ours are audited in _on_requested): max_associations reached."""
        info = self._info(event.assoc)
        if info and not info.rejected:
            reason = f"local limit exceeded: {self.settings.node.max_associations} associations active " \
                     "([node] max_associations)"
            if self.metrics:
                self.metrics.associations.labels("rejected").inc()
            self._audit("association.rejected", "failure", reason=reason, **info.fields())
            log.warning("rejected association %s from %s@%s:%d: %s", info.id, info.calling_aet, info.host,
                        info.port, reason)

    def _on_released(self, event) -> None:  # noqa: ANN001
        info = self._info(event.assoc)
        if info:
            self._audit("association.released", detail=info.counts(), **info.fields())
            log.info("association %s released: %s", info.id, info.counts())
            if info.stored and self.on_released is not None:
                self.on_released(info.id)

    def _on_aborted(self, event) -> None:  # noqa: ANN001
        info = self._info(event.assoc)
        if info and info.abort_reason is None and event.assoc.dul.idle_timer_expired():
            info.abort_reason = (f"no complete PDU within {self.settings.node.network_timeout:g} s "
                                 "([node] network_timeout)")
        if info:
            self._audit("association.aborted", "failure", detail=info.counts(), reason=info.abort_reason,
                        **info.fields())
            log.warning("association %s aborted%s: %s", info.id,
                        f" ({info.abort_reason})" if info.abort_reason else "", info.counts())

    def _on_echo(self, event) -> int:  # noqa: ANN001
        info = self._info(event.assoc)
        self._audit("echo.received", status=STATUS_SUCCESS, **(info.fields() if info else {}))
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ C-STORE

    def _on_store(self, event) -> int | Dataset:  # noqa: ANN001
        info = self._info(event.assoc)
        req = event.request
        rq_sop = str(req.AffectedSOPInstanceUID)
        rq_class = str(req.AffectedSOPClassUID)
        transfer_syntax = str(event.context.transfer_syntax)
        context_class = str(event.context.abstract_syntax)
        data = event.encoded_dataset(include_meta=True)
        size = len(data)
        header = None
        try:
            for name, value in (("SOP Instance", rq_sop), ("SOP Class", rq_class)):
                if not is_valid_uid(value):
                    raise InvalidInstanceError(f"request's Affected {name} UID invalid ({len(value)} chars)")
            why = bad_sop_class(event.assoc, req.MessageID)
            if why:
                raise InvalidInstanceError(f"request's Affected SOP Class UID invalid ({why})")
            if rq_class != context_class:
                return self._fail(STATUS_SOP_CLASS_NOT_SUPPORTED,
                                  f"SOP Class not the presentation context's: {rq_class} on {context_class}",
                                  info, rq_sop, rq_class, header, size)
            # strictly in the negotiated syntax (pydicom would read the wrong one silently), header only
            with req.DataSet.getbuffer() as raw:
                fault = encoding_fault(raw, transfer_syntax)
            if fault:
                raise InvalidInstanceError(f"does not decode: {fault} ({_syntax_name(transfer_syntax)})")
            header = read_header(data, pixels=UID(transfer_syntax).is_deflated)
            if header.sop_class_uid != rq_class:
                raise SOPClassMismatchError(f"dataset SOP Class {header.sop_class_uid} is not the request's")
            if header.sop_instance_uid != rq_sop:
                raise SOPClassMismatchError("dataset SOP Instance UID differs from the request's")
            stored = self.ingest.store(data, header, transfer_syntax, info)
        except InvalidInstanceError as e:
            return self._fail(STATUS_CANNOT_UNDERSTAND, str(e), info, rq_sop, rq_class, header, size)
        except SOPClassMismatchError as e:
            return self._fail(STATUS_SOP_CLASS_MISMATCH, str(e), info, rq_sop, rq_class, header, size)
        except SpoolError as e:
            return self._fail(STATUS_OUT_OF_RESOURCES, str(e), info, rq_sop, rq_class, header, size)
        except SQLAlchemyError as e:
            log.error("database error storing %s: %s", rq_sop, db_error_text(e))
            return self._fail(STATUS_OUT_OF_RESOURCES, "database unavailable; instance not stored",
                              info, rq_sop, rq_class, header, size)
        if info:
            with info.lock:
                if stored:
                    info.stored += 1
                    info.bytes += size
                else:
                    info.duplicates += 1
        if self.metrics:
            self.metrics.instances.labels("stored" if stored else "duplicate").inc()
            if stored:
                self.metrics.bytes.inc(size)
        log.info("%s %s (study %s, %d bytes, %s) from %s", "stored" if stored else "duplicate", rq_sop,
                 header.study_uid, size, transfer_syntax, info.calling_aet if info else "?")
        return STATUS_SUCCESS

    def _fail(self, status: int, reason: str, info: AssociationInfo | None, sop: str, sop_class: str,
              header: Header | None, size: int) -> Dataset:
        log.warning("refused %s with 0x%04X: %s", sop, status, reason)
        if self.metrics:
            self.metrics.instances.labels("failed").inc()
        if info:
            with info.lock:
                info.failed += 1
        self.ingest.record_failure(status, reason, info, sop_instance_uid=sop if is_valid_uid(sop) else None,
                                   sop_class_uid=sop_class if is_valid_uid(sop_class) else None,
                                   header=header, size=size)
        return _status(status, reason)
