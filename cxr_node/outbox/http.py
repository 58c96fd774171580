"""HTTP(S) for the senders that speak it (STOW-RS, QIDO-RS, FHIR): one urllib3 pool per
destination, TLS checked against its CA bundle (or the system's), an optional client
certificate, HTTP basic or bearer credentials read when a request is made (never logged, never
in a message: :func:`cxr_node.config.channels.read_secret`).

urllib3 retries nothing here (``retries=False``): the outbox owns retries, backoff and dead
letters, and each attempt is one audited request. Redirects are not followed (a STOW-RS POST
must not be replayed elsewhere with its credentials).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from cxr_node.config.channels import Destination, Notification, read_secret

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


class TransportError(Exception):
    """No HTTP answer: connection refused, TLS failure, timeout. The text names no credential."""


def _pool(entry: Destination | Notification) -> urllib3.PoolManager:
    kw = {}
    if entry.url.startswith("https:"):
        kw["cert_reqs"] = "CERT_REQUIRED"
        if entry.ca_certificates is not None:
            kw["ca_certs"] = str(entry.ca_certificates)
        if entry.client_certificate is not None:
            kw["cert_file"] = str(entry.client_certificate)
            if entry.client_key is not None:
                kw["key_file"] = str(entry.client_key)
    return urllib3.PoolManager(num_pools=2, maxsize=1, retries=False,
                               timeout=urllib3.Timeout(connect=min(entry.timeout, 10.0), read=entry.timeout), **kw)


def auth_headers(entry: Destination | Notification) -> dict[str, str]:
    secret = read_secret(entry)  # ConfigError naming the file or variable when it cannot be read
    if secret is None:
        return {}
    if entry.auth == "basic":
        return {"Authorization": urllib3.util.make_headers(basic_auth=f"{entry.username}:{secret}")["authorization"]}
    return {"Authorization": f"Bearer {secret}"}


def request(entry: Destination | Notification, method: str, url: str, body: bytes | None = None,
            headers: Mapping[str, str] | None = None) -> Response:
    """One request; raises TransportError when no HTTP answer came (the outbox retries those)."""
    h = {"User-Agent": "cxr-node", **(headers or {}), **auth_headers(entry)}
    pool = _pool(entry)
    try:
        r = pool.request(method, url, body=body, headers=h, redirect=False, preload_content=True)
    except (Urllib3Error, OSError) as e:
        raise TransportError(_describe(e, entry)) from None
    finally:
        pool.clear()
    return Response(r.status, dict(r.headers), r.data or b"")


def _describe(e: BaseException, entry: Destination | Notification) -> str:
    name = type(e).__name__
    if "Timeout" in name:
        return f"no answer from {entry.where} within {entry.timeout:g}s ({name})"
    if "SSL" in name or "Certificate" in str(e):
        return f"TLS with {entry.where} failed: {_short(e)} (check ca_certificates / client_certificate)"
    return f"cannot reach {entry.where}: {_short(e)}"


def _short(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e)
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def body_text(r: Response, limit: int = 200) -> str:
    """A short, printable excerpt of an answer's body for a reason (servers explain their 4xx there),
    quoted parts withheld."""
    from cxr_node.logs import redact_quoted

    text = redact_quoted(r.body[:2000].decode("utf-8", "replace"))  # a server may quote the values it judged
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
