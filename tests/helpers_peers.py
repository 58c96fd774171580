"""Real peers for the HTTP and HL7 senders, started by a test on 127.0.0.1 at a free port: an HTTP
server that answers what the test scripts (a refusing STOW-RS server, a FHIR server, a webhook)
and an MLLP listener that answers each HL7 message with a scripted ACK code, either over TLS when
given a context. Both record what they received, in order. ``make_pki``: a private CA and its
certificates, for the TLS tests."""

from __future__ import annotations

import json
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

from conftest import free_port


@dataclass
class Answer:
    status: int
    body: bytes | dict = b""
    content_type: str = "application/dicom+json"
    delay: float = 0.0   # seconds before answering (a timeout test)


@dataclass
class Received:
    method: str
    path: str
    headers: dict
    body: bytes


@dataclass
class HTTPPeer:
    """Answers each request with the next scripted :class:`Answer` (the last one repeats)."""
    answers: list[Answer] = field(default_factory=lambda: [Answer(200, {})])
    received: list[Received] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # time.time() of each answer (benchmarks)
    tls: object = None  # an ssl.SSLContext (server side): HTTPS, client certificates as it requires

    def __post_init__(self) -> None:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                peer.received.append(Received(self.command, self.path, dict(self.headers), body))
                a = peer.answers[min(len(peer.received) - 1, len(peer.answers) - 1)]
                if a.delay:
                    time.sleep(a.delay)
                data = json.dumps(a.body).encode() if isinstance(a.body, dict) else a.body
                try:
                    self.send_response(a.status)
                    self.send_header("Content-Type", a.content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    peer.answered_at.append(time.time())
                except OSError:  # the client gave up (timeout test)
                    pass

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *a) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


@dataclass
class MLLPPeer:
    """An MLLP listener: each framed message is recorded and answered with an ACK whose MSA-1 is the
    next scripted code ("AA", "AE", "AR"; the last repeats; None: close without answering)."""
    codes: list[str | None] = field(default_factory=lambda: ["AA"])
    received: list[str] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)  # time.time() of each ACK sent (benchmarks)
    tls: object = None  # an ssl.SSLContext (server side): MLLP over TLS, client certificates as it requires
    refused: list[str] = field(default_factory=list)  # why each TLS handshake it refused failed

    def __post_init__(self) -> None:
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buf = b""
                self.request.settimeout(10)
                if peer.tls is not None:
                    try:
                        self.request = peer.tls.wrap_socket(self.request, server_side=True)
                    except OSError as e:  # ssl.SSLError included: no client certificate, an unknown CA
                        peer.refused.append(str(e))
                        return
                while True:
                    try:
                        chunk = self.request.recv(65536)
                    except (socket.timeout, OSError):
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while SB in buf and EB + CR in buf:
                        start, end = buf.index(SB), buf.index(EB + CR)
                        msg = buf[start + 1:end].decode("utf-8")
                        buf = buf[end + 2:]
                        peer.received.append(msg)
                        code = peer.codes[min(len(peer.received) - 1, len(peer.codes) - 1)]
                        if code is None:
                            return
                        self.request.sendall(SB + ack(msg, code).encode() + EB + CR)
                        peer.acked_at.append(time.time())

        self.port = free_port()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_pki(d: Path, names: Sequence[str], rogue: bool = False) -> Path:
    """A private CA (``d/ca.pem``) and, for each name, a certificate it signed for IP 127.0.0.1
    (``d/NAME.pem``, ``d/NAME.key``), made with the openssl command; ``rogue``: also a self-signed
    ``d/rogue.pem`` no CA knows."""
    from conftest import require_tool

    def openssl(*args: str) -> None:
        subprocess.run([require_tool("openssl", "openssl"), *args], cwd=d, check=True, capture_output=True,
                       timeout=60)

    d.mkdir(parents=True, exist_ok=True)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=cxr-node test CA")
    for name in names:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    if rogue:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem",
                "-days", "2", "-subj", "/CN=rogue")
    return d


def server_context(d: Path, name: str, require_client: bool = True):
    """A server-side ssl.SSLContext with ``d/NAME.pem`` that trusts the CA of :func:`make_pki`."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / f"{name}.pem", d / f"{name}.key")
    ctx.load_verify_locations(d / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
    return ctx


def segments(msg: str) -> dict[str, list[list[str]]]:
    """A message's segments by name, each split into fields (``[name, field1, ...]``; MSH keeps
    MSH-1 as its field 1)."""
    out: dict[str, list[list[str]]] = {}
    for seg in filter(None, msg.replace("\n", "\r").split("\r")):
        f = seg.split("|")
        if f[0] == "MSH":
            f = ["MSH", "|"] + f[1:]
        out.setdefault(f[0], []).append(f)
    return out


def ack(msg: str, code: str) -> str:
    msh = segments(msg)["MSH"][0]
    control = msh[10]
    text = {"AA": "", "AE": "temporary error", "AR": "rejected: unknown patient"}.get(code, "")
    return (f"MSH|^~\\&|RIS|HOSP|{msh[3]}|{msh[4]}|20261206120000||ACK^R01^ACK|ACK{control}|P|2.5.1\r"
            f"MSA|{code}|{control}|{text}\r")
