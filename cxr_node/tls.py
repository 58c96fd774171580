"""DICOM TLS (PS3.15 B.9/BCP 195) contexts for the receiver and the sender, from ``[tls]``.

The receiver uses TLS when ``certificate`` and ``private_key`` are set; with
``require_client_certificate`` a peer must present a certificate signed by ``ca_certificates``.
A destination with ``tls = true`` is called over TLS, verifying its certificate against
``ca_certificates`` (and its host name or IP address against the certificate), and presenting
ours for client authentication.
"""

from __future__ import annotations

import ssl

from cxr_node.config import TLSSettings
from cxr_node.errors import ConfigError


def _load(ctx: ssl.SSLContext, tls: TLSSettings, what: str) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.certificate:
            ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_certificates:
            ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[tls]: cannot load the {what} certificates/key: {e}") from e
    return ctx


def server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls, "receiver")
    if tls.require_client_certificate:
        if not tls.ca_certificates:
            raise ConfigError("[tls] require_client_certificate: needs ca_certificates to check clients against")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    if not tls.ca_certificates:
        raise ConfigError("a destination with tls = true needs [tls] ca_certificates to verify it")
    ctx = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls, "sender")
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def deferred_handshake_server_class(on_failure, handshake_timeout: float):  # noqa: ANN001, ANN201
    """A pynetdicom server class that does the TLS handshake in each connection's own thread.

    pynetdicom's ``AssociationServer.get_request`` wraps the accepted socket with the default
    ``do_handshake_on_connect=True``, i.e. in the single accept loop with no timeout: one peer that
    opens a TCP connection and says nothing stops every other peer from connecting (measured here:
    a trusted storescu waited out its full 60 s). This class accepts, wraps without handshaking,
    and handshakes in the per-connection thread with ``handshake_timeout``; a failure (untrusted
    certificate, plain DICOM on the TLS port, silence) calls ``on_failure(host, port, reason)`` and
    closes that connection only.
    """
    from pynetdicom.transport import ThreadedAssociationServer

    class DeferredHandshakeServer(ThreadedAssociationServer):
        def get_request(self):  # noqa: ANN202
            sock, address = self.socket.accept()
            if self.ssl_context:
                sock.settimeout(handshake_timeout)
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, address

        def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.do_handshake()
                except (ssl.SSLError, OSError) as e:  # TimeoutError is an OSError
                    reason = "TLS handshake timed out" if isinstance(e, TimeoutError) else \
                        f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
                    try:
                        on_failure(str(client_address[0]), int(client_address[1]), reason)
                    finally:
                        self.shutdown_request(request)
                    return
                request.settimeout(None)  # as pynetdicom's own accepted sockets: it manages timeouts itself
            super().process_request_thread(request, client_address)

    return DeferredHandshakeServer
