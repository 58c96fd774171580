"""DICOM TLS (PS3.15 B.9/BCP 195) contexts for the receiver and the sender, from ``[tls]``.

The receiver uses TLS when ``certificate`` and ``private_key`` are set; with
``require_client_certificate`` a peer must present a certificate signed by ``ca_certificates``.
A destination with ``tls = true`` is called over TLS, verifying its certificate against
``ca_certificates`` (and its host name or IP address against the certificate), and presenting
ours for client authentication.

The receiver's handshake runs in each connection's own thread with a timeout
(``receive.GuardedServer``): pynetdicom's server would run it in its accept loop, where one
peer that connects and says nothing stops every other peer from connecting.
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
