"""Where results and notifications go: ``[[destinations]]`` (C-STORE or DICOMweb STOW-RS) and
``[[notifications]]`` (HL7 v2 ORU^R01 over MLLP, FHIR R4), and the ``[triage] triggers``.

A destination or a notification is a kind plus its settings; the outbox does not care which
(cxr_node.outbox.channels picks the sender). Credentials are never held here: a destination
names the file or the environment variable that holds its password or token, read when a
request is made (:func:`read_secret`), so no settings dump, log line or audit row can show one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from cxr_node.config.schema import Rule, _ae_title, _bool, _choice, _host, _int, _number, _str, array_of_tables
from cxr_node.errors import ConfigError

DIMSE, DICOMWEB = "dimse", "dicomweb"
HL7V2, FHIR = "hl7v2", "fhir"


@dataclass(frozen=True)
class Destination:
    """A ``[[destinations]]`` entry: ``kind`` "dimse" (C-STORE to ``ae_title@host:port``) or
    "dicomweb" (STOW-RS to ``url``, the DICOMweb root, e.g. ``https://pacs/dicom-web``)."""
    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    kind: str = DIMSE
    url: str = ""
    #: HTTPS: PEM CA bundle the server is checked against (None: the system's), client certificate
    #: (PEM, the key in it or in client_key)
    ca_certificates: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    auth: str = "none"            # none | basic | bearer
    username: str = ""            # basic
    secret_file: Path | None = None  # the password (basic) or token (bearer), first line of the file
    secret_env: str = ""          # ... or this environment variable
    timeout: float = 30.0

    @property
    def where(self) -> str:
        """For messages and the audit: never a credential (a URL's user:password part is dropped)."""
        if self.kind == DICOMWEB:
            return public_url(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}{' TLS' if self.tls else ''}"


@dataclass(frozen=True)
class Notification:
    """A ``[[notifications]]`` entry: who is told when a study is flagged urgent (and again, as a
    correction, when a later version changes the call)."""
    name: str
    kind: str                     # hl7v2 | fhir
    host: str = ""                # hl7v2: the MLLP listener
    port: int = 0
    url: str = ""                 # fhir: a FHIR base URL (a transaction Bundle is posted to it) or a webhook
    sending_application: str = "CXRNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    tls: bool = False             # hl7v2: MLLP over TLS (the listener's certificate and host name checked)
    ca_certificates: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    auth: str = "none"
    username: str = ""
    secret_file: Path | None = None
    secret_env: str = ""
    timeout: float = 10.0

    @property
    def where(self) -> str:
        if self.kind == FHIR:
            return public_url(self.url)
        return f"MLLP{' over TLS' if self.tls else ''} {self.host}:{self.port}"


def public_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    p = urlsplit(url)
    netloc = p.netloc.rsplit("@", 1)[-1]
    return p._replace(netloc=netloc).geturl()


def read_secret(entry: Destination | Notification) -> str | None:
    """The password or token of ``entry``, read now from its file or environment variable; None when
    it has no credentials. Raises ConfigError naming the source (never the value)."""
    if entry.auth == "none":
        return None
    if entry.secret_file is not None:
        try:
            value = entry.secret_file.read_text(encoding="utf-8").splitlines()[0].strip() \
                if entry.secret_file.stat().st_size else ""
        except OSError as e:
            raise ConfigError(f"{entry.name}: cannot read secret_file {entry.secret_file}: {e.strerror}") from None
        if not value:
            raise ConfigError(f"{entry.name}: secret_file {entry.secret_file} is empty")
        return value
    value = os.environ.get(entry.secret_env, "")
    if not value:
        raise ConfigError(f"{entry.name}: environment variable {entry.secret_env} is not set or empty "
                          f"(it holds the {'password' if entry.auth == 'basic' else 'token'})")
    return value


def _url(v: Any) -> str:
    if not isinstance(v, str) or urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname:
        raise Rule(f"must be an http:// or https:// URL (got {v!r})")
    if urlsplit(v).password:
        raise Rule("must not hold a password: put it in secret_file or secret_env")
    return v.rstrip("/")


def _env_name(v: Any) -> str:
    if not isinstance(v, str) or (v and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v)):
        raise Rule(f"must be an environment variable name (got {v!r})")
    return v


def _hl7_id(v: Any) -> str:
    if not isinstance(v, str) or len(v) > 180 or any(c in v for c in "|^~\\&\r\n"):
        raise Rule(f"must be text without the HL7 delimiters | ^ ~ \\ & (got {v!r})")
    return v


_HTTP = {"ca_certificates": _str, "client_certificate": _str, "client_key": _str,
         "auth": _choice("none", "basic", "bearer"), "username": _str, "secret_file": _str, "secret_env": _env_name,
         "timeout": _number(0.5, 600)}
DESTINATION_KEYS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "name": (_str, None), "kind": (_choice(DIMSE, DICOMWEB), DIMSE),
    "ae_title": (_ae_title, None), "host": (_host, None), "port": (_int(1, 65535), None), "tls": (_bool, False),
    "url": (_url, None), **{k: (check, None) for k, check in _HTTP.items()}}
NOTIFICATION_KEYS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "name": (_str, None), "kind": (_choice(HL7V2, FHIR), None), "host": (_host, None), "port": (_int(1, 65535), None),
    "url": (_url, None), "sending_application": (_hl7_id, None), "sending_facility": (_hl7_id, None),
    "receiving_application": (_hl7_id, None), "receiving_facility": (_hl7_id, None), "tls": (_bool, False),
    **{k: (check, None) for k, check in _HTTP.items()}}
#: MLLP over TLS: on with ``tls = true``; the certificate keys apply only then
_MLLP_TLS = ("tls", "ca_certificates", "client_certificate", "client_key")
#: which keys each kind needs (R) and which it may have (O); the others are refused for that kind
_NEEDS = {DIMSE: ({"ae_title", "host", "port"}, {"tls"}),
          DICOMWEB: ({"url"}, set(_HTTP)),
          HL7V2: ({"host", "port"}, {"sending_application", "sending_facility", "receiving_application",
                                     "receiving_facility", "timeout", *_MLLP_TLS}),
          FHIR: ({"url"}, set(_HTTP))}


def _entries(raw: Any, section: str, keys: dict, fail: Callable[[str, str], ConfigError],
             default_kind: str | None) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for label, d in array_of_tables(raw, section, keys, fail):
        kind = d.get("kind", default_kind)
        if kind is None:
            raise fail(f"{label} kind", f"is required ({' or '.join(k for k in _NEEDS if k in (HL7V2, FHIR))})")
        try:
            kind = keys["kind"][0](kind)
        except Rule as r:
            raise fail(f"{label} kind", str(r)) from r
        required, optional = _NEEDS[kind]
        kw: dict[str, Any] = {"kind": kind}
        for key, (check, _) in keys.items():
            if key == "kind":
                continue
            if key not in d:
                if key == "name" or key in required:
                    raise fail(f"{label} {key}", "is required" + ("" if key == "name" else f" for kind {kind!r}"))
                continue
            if key != "name" and key not in required and key not in optional:
                raise fail(f"{label} {key}", f"does not apply to kind {kind!r}")
            try:
                kw[key] = check(d[key])
            except Rule as r:
                raise fail(f"{label} {key}", str(r)) from r
        kw["name"] = kw["name"].strip()
        if not kw["name"]:
            raise fail(f"{label} name", "must not be empty")
        if any(x["name"] == kw["name"] for _, x in out):
            raise fail(f"{label} name", f"must be unique ({kw['name']!r} is used twice)")
        if kw.get("auth", "none") != "none":
            if not kw.get("secret_file") and not kw.get("secret_env"):
                raise fail(f"{label} secret_file", f"auth {kw['auth']!r} needs secret_file or secret_env")
            if kw["auth"] == "basic" and not kw.get("username"):
                raise fail(f"{label} username", "is required with auth \"basic\"")
        elif kw.get("secret_file") or kw.get("secret_env"):
            raise fail(f"{label} auth", "secret_file/secret_env given but auth is \"none\"")
        if kw.get("client_key") and not kw.get("client_certificate"):
            raise fail(f"{label} client_key", "needs client_certificate")
        if kind == HL7V2 and not kw.get("tls"):
            for key in _MLLP_TLS[1:]:
                if kw.get(key):
                    raise fail(f"{label} {key}", "applies to MLLP only with tls = true")
        out.append((label, kw))
    return out


def _paths(kw: dict[str, Any], resolve: Callable[[str], Path]) -> dict[str, Any]:
    for key in ("ca_certificates", "client_certificate", "client_key", "secret_file"):
        if key in kw:
            kw[key] = resolve(kw[key]) if kw[key] else None
    return kw


def parse_destinations(raw: Any, fail, resolve) -> tuple[Destination, ...]:
    return tuple(Destination(**_paths(kw, resolve)) for _, kw in _entries(raw, "destinations", DESTINATION_KEYS,
                                                                          fail, DIMSE))


def parse_notifications(raw: Any, fail, resolve) -> tuple[Notification, ...]:
    return tuple(Notification(**_paths(kw, resolve)) for _, kw in _entries(raw, "notifications", NOTIFICATION_KEYS,
                                                                           fail, None))


def summary(entry: Destination | Notification) -> dict[str, Any]:
    """What ``status`` and the audit may show of an entry: its kind and where, never a credential."""
    d: dict[str, Any] = {"name": entry.name, "kind": entry.kind}
    if isinstance(entry, Destination) and entry.kind == DIMSE:
        d.update(ae_title=entry.ae_title, host=entry.host, port=entry.port, tls=entry.tls)
    else:
        d["where"] = entry.where
        if entry.auth != "none":
            d["auth"] = entry.auth
    return d


def file_warnings(entries: Sequence[Destination | Notification]) -> list[str]:
    """A line for each certificate, key or secret file an entry names that this process cannot read
    now: sending to it would fail at every attempt (``check-config`` and the daemon's start say so)."""
    out = []
    for e in entries:
        for key in ("ca_certificates", "client_certificate", "client_key", "secret_file"):
            path = getattr(e, key, None)
            if path is None:
                continue
            if not path.is_file():
                out.append(f"{e.name}: {key} {path} does not exist (or is not a file): sends to it will fail")
            elif not os.access(path, os.R_OK):
                out.append(f"{e.name}: {key} {path} cannot be read by this user: sends to it will fail")
    return out
