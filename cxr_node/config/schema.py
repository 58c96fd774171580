"""What every configuration key may hold: one rule per value (ranges, AE titles, CIDR lists, ...)
and the table of every section, key, rule and default (the raw TOML value). ``config/cxr-node.toml``
documents every key with its default; a test checks that it agrees with :data:`SCHEMA`.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

DEFAULT_DATA_DIR = "/var/lib/cxr-node"


# --------------------------------------------------------------------------- validators


class Rule(Exception):
    """A rule broken by one value; turned into a ConfigError naming the key."""


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise Rule(f"must be an integer from {lo} to {hi} (got {v!r})")
        return v

    return check


def _number(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise Rule(f"must be a number from {lo:g} to {hi:g} (got {v!r})")
        return float(v)

    return check


def _ae_title(v: Any) -> str:
    # PS3.5 AE VR: 1-16 characters of the default repertoire, no backslash or control chars;
    # leading/trailing spaces are not significant.
    if not isinstance(v, str):
        raise Rule(f"must be a string (got {v!r})")
    s = v.strip()
    if not 1 <= len(s) <= 16:
        raise Rule(f"must be 1 to 16 characters, not counting spaces (got {v!r})")
    if any(c == "\\" or ord(c) < 32 or ord(c) > 126 for c in s):
        raise Rule(f"must be printable ASCII without backslash (got {v!r})")
    return s


def _ae_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise Rule(f"must be a list of AE titles (got {v!r})")
    return tuple(_ae_title(x) for x in v)


def _cidr_list(v: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(v, list):
        raise Rule(f"must be a list of CIDR networks like \"10.1.0.0/16\" (got {v!r})")
    out = []
    for x in v:
        try:
            out.append(ipaddress.ip_network(str(x), strict=False))
        except ValueError:
            raise Rule(f"must be a list of CIDR networks like \"10.1.0.0/16\" ({x!r} is not one)") from None
    return tuple(out)


def _host(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise Rule(f"must be a non-empty host name or IP address (got {v!r})")
    return v.strip()


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise Rule(f"must be a string (got {v!r})")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Rule(f"must be true or false (got {v!r})")
    return v


def _word_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise Rule(f"must be a list of non-empty strings (got {v!r})")
    return tuple(x.strip().upper() for x in v)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v.upper() not in {o.upper() for o in options}:
            raise Rule(f"must be one of {', '.join(options)} (got {v!r})")
        return v.lower() if options[0].islower() else v.upper()

    return check


def _trigger_list(v: Any) -> tuple[str, ...]:
    """Output names as the model calls them ("abnormal", "COVID-19"): kept as written, matched
    case-insensitively (cxr_node.model.triggers)."""
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise Rule(f"must be a list of output names like [\"abnormal\"] (got {v!r})")
    return tuple(x.strip() for x in v)


# section -> key -> (validator, default). Defaults are the raw TOML values.
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "node": {
        "ae_title": (_ae_title, "CXRNODE"),
        "host": (_host, "0.0.0.0"),
        "port": (_int(1, 65535), 11112),
        "allowed_calling_aets": (_ae_list, []),
        "allowed_hosts": (_cidr_list, []),
        "max_pdu": (_int(0, 2**32 - 1), 131072),
        "max_associations": (_int(1, 1000), 16),
        "max_connections_per_host": (_int(1, 1000), 8),
        "association_request_timeout": (_number(0.5, 3600), 10),
        "network_timeout": (_number(1, 3600), 60),
        "acse_timeout": (_number(1, 3600), 30),
        "dimse_timeout": (_number(1, 3600), 60),
        "drain_seconds": (_number(0, 3600), 30),
    },
    "storage": {"data_dir": (_str, DEFAULT_DATA_DIR)},
    "database": {"url": (_str, "")},
    "study": {"quiet_seconds": (_number(0.1, 86400), 30), "max_attempts": (_int(1, 100), 3),
              "retry_seconds": (_number(0, 86400), 60), "complete_on_release": (_bool, True),
              "release_grace_seconds": (_number(0, 3600), 2), "round_films": (_int(2, 256), 4)},
    "model": {"checkpoint": (_str, ""), "device": (_choice("auto", "cpu", "cuda"), "auto"),
              "batch_size": (_int(1, 256), 8), "preload": (_bool, True),
              "lung_checkpoint": (_str, ""), "ood_reference": (_str, "")},
    "eligibility": {
        "body_parts": (_word_list, ["CHEST", "THORAX", "LUNG", "CHEST_PA", "CHEST_AP", "THORAX_PA", "THORAX_AP",
                                    "TORAX", "THX", "BRUST", "BRUSTKORB", "POITRINE", "TORACE", "PECHO"]),
        "views": (_word_list, ["PA", "AP", "AP SUPINE", "AP_SUPINE", "APS", "PA_ERECT", "AP_ERECT"]),
        "check_pixels": (_bool, True),
        "report_non_chest": (_bool, False),
    },
    "outbox": {
        "poll_seconds": (_number(0.1, 3600), 2),
        "retry_base_seconds": (_number(0.1, 86400), 10),
        "retry_max_seconds": (_number(1, 86400), 900),
        "max_attempts": (_int(1, 1000), 15),
        "sc_max_rows": (_int(512, 8192), 2048),
    },
    "fleet": {"heartbeat_seconds": (_number(0.2, 3600), 10), "lease_seconds": (_number(1, 86400), 30)},
    "retention": {"days": (_number(0, 36500), 0)},
    "tls": {"certificate": (_str, ""), "private_key": (_str, ""), "ca_certificates": (_str, ""),
            "require_client_certificate": (_bool, True)},
    "metrics": {"port": (_int(0, 65535), 0)},
    "logging": {"level": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")},
    "web": {"host": (_host, "127.0.0.1"), "port": (_int(1, 65535), 8080), "certificate": (_str, ""),
            "private_key": (_str, ""), "idle_minutes": (_number(1, 1440), 30),
            "session_hours": (_number(0.1, 168), 12), "trusted_proxies": (_cidr_list, [])},
    "triage": {"triggers": (_trigger_list, [])},
    "onboarding": {
        "new_stations": (_choice("active", "shadow"), "active"),
        "min_per_class": (_int(1, 100000), 50),
        "target_sensitivity": (_number(0.5, 1.0), 0.95),
        "drift_window": (_int(5, 1000000), 200),
        "drift_min_films": (_int(5, 1000000), 50),
        "drift_threshold": (_number(0.01, 10), 0.25),
        "adapt_min_per_class": (_int(5, 100000), 30),
    },
}
STATION_KEYS = {"name": _str, "ae_title": _ae_title, "mode": _choice("active", "shadow"), "station_name": _str,
                 "institution_name": _str, "triggers": _trigger_list}
STATION_OPTIONAL = {"station_name": "", "institution_name": "", "triggers": None}


def schema_defaults() -> dict[str, dict[str, Any]]:
    """The documented default of every key, as raw TOML values."""
    return {sec: {k: d for k, (_, d) in keys.items()} for sec, keys in SCHEMA.items()}


def array_of_tables(raw: Any, name: str, keys, fail: Callable[[str, str], Exception]):
    """``[[name]]``'s entries, each a table holding only ``keys``: ``(label for messages, the table)``
    each; the checks every array of tables shares (stations, destinations, notifications)."""
    if not isinstance(raw, list):
        raise fail(f"[[{name}]]", f"must be an array of tables ([[{name}]])")
    for i, d in enumerate(raw):
        label = f"[[{name}]] #{i + 1}"
        if not isinstance(d, dict):
            raise fail(label, "must be a table")
        extra = set(d) - set(keys)
        if extra:
            raise fail(f"{label} {sorted(extra)[0]}", f"unknown key (known: {', '.join(keys)})")
        yield label, d
