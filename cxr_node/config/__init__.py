"""Settings from a TOML file, validated once at start and passed explicitly.

The file is named by ``--config`` or the ``CXR_NODE_CONFIG`` environment variable. Relative
paths inside it are resolved against the directory that holds the file, never against the
working directory. Every rule failure names the key and the rule, e.g.::

    config/cxr-node.toml: [node] port: must be an integer from 1 to 65535 (got 70000)

``config/cxr-node.toml`` documents every key with its default; keep it in step with
``SCHEMA`` below (a test checks that they agree).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cxr_node.config import layers
from cxr_node.config.bundled import BUNDLED_CHECKPOINT as BUNDLED_CHECKPOINT  # part of this module's API
from cxr_node.config.bundled import BUNDLED_DIR as BUNDLED_DIR
from cxr_node.config.bundled import BUNDLED_LUNG_CHECKPOINT as BUNDLED_LUNG_CHECKPOINT
from cxr_node.config.bundled import BUNDLED_MODELS as BUNDLED_MODELS
from cxr_node.config.bundled import checkpoint_setting
from cxr_node.config.channels import Destination as Destination  # part of this module's API
from cxr_node.config.channels import Notification as Notification
from cxr_node.config.channels import parse_destinations, parse_notifications
from cxr_node.config.schema import (
    DEFAULT_DATA_DIR,
    SCHEMA,
    STATION_KEYS,
    STATION_OPTIONAL,
    Rule,
    array_of_tables,
)
from cxr_node.config.schema import schema_defaults as schema_defaults  # part of this module's API
from cxr_node.errors import ConfigError

ENV_VAR = "CXR_NODE_CONFIG"


# The settings classes have no defaults of their own: every default is in SCHEMA (the documented
# TOML value) and reaches them through parse(), so there is one place to read or change them.


@dataclass(frozen=True)
class Station:
    """A sending station (``[[stations]]``): films whose calling AE title is ``ae_title`` (and, when
    given, whose StationName / InstitutionName match) belong to it."""
    name: str
    ae_title: str
    mode: str                    # "active" | "shadow"
    station_name: str            # "" = any
    institution_name: str        # "" = any
    triggers: tuple[str, ...] | None = None  # None: [triage] triggers


@dataclass(frozen=True)
class TriageSettings:
    """Which outputs may raise a study to urgent (cxr_node.model.triggers): "abnormal" and/or class
    labels; empty: the model's own critical outputs. A station's ``triggers`` replaces these."""
    triggers: tuple[str, ...]


@dataclass(frozen=True)
class OnboardingSettings:
    new_stations: str            # mode of stations not in [[stations]]: "active" | "shadow"
    min_per_class: int           # calibrate-site refuses with fewer labelled films of a class
    target_sensitivity: float    # calibrate-site's default for the critical classes
    drift_window: int            # films per station in the rolling window
    drift_min_films: int         # no drift verdict with fewer films in the window
    drift_threshold: float       # population stability index past which a statistic has moved
    adapt_min_per_class: int = 30  # adapt-site's minimum abnormal and normal films (abnormality output)


@dataclass(frozen=True)
class TLSSettings:
    certificate: Path | None
    private_key: Path | None
    ca_certificates: Path | None
    require_client_certificate: bool

    @property
    def enabled(self) -> bool:
        """The receiver listens with TLS (certificate and key given)."""
        return self.certificate is not None


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str
    host: str
    port: int
    allowed_calling_aets: tuple[str, ...]
    allowed_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_pdu: int
    max_associations: int
    max_connections_per_host: int
    association_request_timeout: float
    network_timeout: float
    acse_timeout: float
    dimse_timeout: float
    drain_seconds: float


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        """Result objects waiting to be sent (written before their outbox row exists)."""
        return self.data_dir / "outbox"

    @property
    def incoming_dir(self) -> Path:
        """Temp files being written (a subdirectory per node); same filesystem as the spool so
        rename is atomic."""
        return self.data_dir / "incoming"


@dataclass(frozen=True)
class DatabaseSettings:
    url: str


@dataclass(frozen=True)
class StudySettings:
    quiet_seconds: float
    max_attempts: int = 3
    retry_seconds: float = 60
    complete_on_release: bool = True      # the release of the delivering association completes a study
    release_grace_seconds: float = 2      # ... once nothing more arrived for this long after it
    round_films: int = 4                  # films per round of the worker (cxr_node.study.scheduling)


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: Path
    device: str
    batch_size: int
    preload: bool
    lung_checkpoint: Path | None   # None: the bundled lung segmenter
    ood_reference: Path | None     # None: beside the checkpoint (NAME.ood.pt)


@dataclass(frozen=True)
class EligibilitySettings:
    """Which films are analysed (cxr_node.eligibility.rules): header values, then the pixels."""
    body_parts: tuple[str, ...]
    views: tuple[str, ...]
    check_pixels: bool
    report_non_chest: bool   # an SR (all films "Not analysed") even for a study with no chest film by its header


@dataclass(frozen=True)
class OutboxSettings:
    poll_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float
    max_attempts: int
    sc_max_rows: int   # the Secondary Capture keeps the film's resolution up to this many rows


@dataclass(frozen=True)
class FleetSettings:
    """Nodes sharing one database (cxr_node.study.leases): each renews its lease every
    heartbeat_seconds; one not renewed for lease_seconds is taken over by the others."""
    heartbeat_seconds: float = 10
    lease_seconds: float = 30


@dataclass(frozen=True)
class RetentionSettings:
    days: float  # 0 = keep everything

    @property
    def enabled(self) -> bool:
        return self.days > 0


@dataclass(frozen=True)
class MetricsSettings:
    port: int  # 0 = no metrics endpoint


@dataclass(frozen=True)
class LoggingSettings:
    level: str


@dataclass(frozen=True)
class WebSettings:
    """The web console (``cxr-node web``, a process of its own): address, TLS, sessions."""
    host: str
    port: int
    certificate: Path | None
    private_key: Path | None
    idle_minutes: float     # a session unused this long is over (log in again)
    session_hours: float    # a session ends this long after login, used or not
    #: reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (empty: none)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def tls(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class Settings:
    node: NodeSettings
    storage: StorageSettings
    database: DatabaseSettings
    study: StudySettings
    model: ModelSettings
    eligibility: EligibilitySettings
    outbox: OutboxSettings
    retention: RetentionSettings
    tls: TLSSettings
    metrics: MetricsSettings
    logging: LoggingSettings
    web: WebSettings
    destinations: tuple[Destination, ...] = ()
    source: Path | None = None
    extends: tuple[Path, ...] = ()  # the files `source` extends, nearest first
    onboarding: OnboardingSettings | None = None  # None only for Settings built by hand; parse() sets it
    stations: tuple[Station, ...] = ()
    notifications: tuple[Notification, ...] = ()
    triage: TriageSettings = TriageSettings(triggers=())
    fleet: FleetSettings = FleetSettings()

    def notification(self, name: str) -> Notification:
        for d in self.notifications:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.notifications) or "none configured"
        raise ConfigError(f"no notification named {name!r} in [[notifications]] (known: {known})")

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} in [[destinations]] (known: {known})")


def destinations_warning(settings: Settings) -> str | None:
    """One line for start-up, ``status`` and ``check-config`` when results go nowhere, else None.

    Without ``[[destinations]]`` results are still encoded and kept under ``data_dir/outbox``;
    ``cxr-node resend`` queues them once a destination is configured."""
    if settings.destinations:
        return None
    return (f"no [[destinations]] configured: results are kept in {settings.storage.outbox_dir} but sent "
            "nowhere; add a [[destinations]] entry, reload the daemon (`systemctl reload cxr-node` or SIGHUP), "
            "then `cxr-node resend STUDY_UID` sends the results made meanwhile")


def exposure_warning(settings: Settings) -> str | None:
    """One line when the receiver takes films from anyone who can reach its port: it listens on
    an address other than loopback and both ``allowed_calling_aets`` and ``allowed_hosts`` are
    empty (the shipped defaults). Allowed, but ``serve`` logs it at start-up and ``check-config``
    prints it; None otherwise."""
    n = settings.node
    if n.allowed_calling_aets or n.allowed_hosts:
        return None
    try:
        if ipaddress.ip_address(n.host).is_loopback:
            return None
    except ValueError:
        if n.host == "localhost":
            return None
    where = "every interface" if n.host in ("0.0.0.0", "::") else n.host
    return (f"[node] listens on {where} (port {n.port}) and accepts any calling AE title from any host: "
            "set allowed_calling_aets and/or allowed_hosts (or host) to limit who can send films")


def web_warning(settings: Settings) -> str | None:
    """One line when the web console would serve plain HTTP on an address other than loopback
    (passwords and patient data unencrypted on the network); None otherwise."""
    w = settings.web
    if w.tls or w.host in ("localhost",):
        return None
    try:
        if ipaddress.ip_address(w.host).is_loopback:
            return None
    except ValueError:
        pass
    return (f"[web] host {w.host} without certificate/private_key: the console's passwords and patient data "
            "would cross the network unencrypted; set [web] certificate and private_key, or keep host on "
            "127.0.0.1 behind a TLS reverse proxy")


def config_path_from(arg: str | os.PathLike[str] | None) -> Path | None:
    """The file named by ``--config``, else by ``CXR_NODE_CONFIG``, else None (defaults)."""
    if arg:
        return Path(arg)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


def load(path: str | os.PathLike[str] | None) -> Settings:
    """Read and validate a config file (and the files it ``extends``, see :mod:`.layers`);
    ``None`` gives the built-in defaults."""
    if path is None:
        return parse({}, base_dir=Path(DEFAULT_DATA_DIR), source=None)
    p = Path(path).expanduser().resolve()
    raw, bases = layers.read(p, ENV_VAR)
    return parse(raw, base_dir=p.parent, source=p, extends=bases)


def parse(raw: dict[str, Any], base_dir: Path, source: Path | None = None,
          extends: tuple[Path, ...] = ()) -> Settings:
    where = f"{source}: " if source else ""

    def fail(key: str, rule: str) -> ConfigError:
        return ConfigError(f"{where}{key}: {rule}")

    unknown = set(raw) - set(SCHEMA) - {"destinations", "stations", "notifications"}
    if unknown:
        raise fail(f"[{sorted(unknown)[0]}]",
                   f"unknown section (known: {', '.join(sorted(SCHEMA))}, destinations, stations, notifications)")

    values: dict[str, dict[str, Any]] = {}
    for sec, keys in SCHEMA.items():
        table = raw.get(sec, {})
        if not isinstance(table, dict):
            raise fail(f"[{sec}]", "must be a table")
        extra = set(table) - set(keys)
        if extra:
            raise fail(f"[{sec}] {sorted(extra)[0]}", f"unknown key (known: {', '.join(keys)})")
        values[sec] = {}
        for key, (check, default) in keys.items():
            try:
                values[sec][key] = check(table.get(key, default))
            except Rule as r:
                raise fail(f"[{sec}] {key}", str(r)) from r

    stations = _parse_stations(raw.get("stations", []), fail)
    o, f = values["onboarding"], values["fleet"]
    if f["lease_seconds"] < 2 * f["heartbeat_seconds"]:
        raise fail("[fleet] lease_seconds", f"must be at least twice heartbeat_seconds ({f['heartbeat_seconds']:g}), "
                   "so that one late heartbeat does not end a live node's lease")
    if o["drift_min_films"] > o["drift_window"]:
        raise fail("[onboarding] drift_min_films", f"must not exceed drift_window ({o['drift_window']})")

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (base_dir / q).resolve()

    dests = parse_destinations(raw.get("destinations", []), fail, resolve)
    notifications = parse_notifications(raw.get("notifications", []), fail, resolve)

    data_dir = resolve(values["storage"]["data_dir"])
    url = values["database"]["url"] or f"sqlite:///{data_dir / 'cxr-node.db'}"
    ckpt = values["model"]["checkpoint"]
    m = values["model"]
    t = values["tls"]
    if bool(t["certificate"]) != bool(t["private_key"]):
        raise fail("[tls] private_key", "certificate and private_key must be given together")
    tls = TLSSettings(certificate=resolve(t["certificate"]) if t["certificate"] else None,
                      private_key=resolve(t["private_key"]) if t["private_key"] else None,
                      ca_certificates=resolve(t["ca_certificates"]) if t["ca_certificates"] else None,
                      require_client_certificate=t["require_client_certificate"])
    w = values["web"]
    if bool(w["certificate"]) != bool(w["private_key"]):
        raise fail("[web] private_key", "certificate and private_key must be given together")
    web = WebSettings(host=w["host"], port=w["port"],
                      certificate=resolve(w["certificate"]) if w["certificate"] else None,
                      private_key=resolve(w["private_key"]) if w["private_key"] else None,
                      idle_minutes=w["idle_minutes"], session_hours=w["session_hours"],
                      trusted_proxies=w["trusted_proxies"])
    return Settings(
        node=NodeSettings(**values["node"]),
        storage=StorageSettings(data_dir=data_dir),
        database=DatabaseSettings(url=url),
        study=StudySettings(**values["study"]),
        model=ModelSettings(checkpoint=checkpoint_setting(ckpt, resolve, fail), device=values["model"]["device"],
                            batch_size=values["model"]["batch_size"], preload=values["model"]["preload"],
                            lung_checkpoint=resolve(m["lung_checkpoint"]) if m["lung_checkpoint"] else None,
                            ood_reference=resolve(m["ood_reference"]) if m["ood_reference"] else None),
        eligibility=EligibilitySettings(**values["eligibility"]),
        outbox=OutboxSettings(**values["outbox"]),
        retention=RetentionSettings(days=values["retention"]["days"]),
        tls=tls,
        metrics=MetricsSettings(port=values["metrics"]["port"]),
        logging=LoggingSettings(**values["logging"]),
        web=web,
        destinations=dests,
        source=source,
        extends=extends,
        onboarding=OnboardingSettings(**values["onboarding"]),
        stations=stations,
        notifications=notifications,
        triage=TriageSettings(triggers=tuple(dict.fromkeys(values["triage"]["triggers"]))),
        fleet=FleetSettings(**f),
    )


def _tables(raw: Any, name: str, keys: dict[str, Callable[[Any], Any]], optional: dict[str, Any],
            fail: Callable[[str, str], ConfigError]) -> list[tuple[str, dict[str, Any]]]:
    """An array of tables (``[[name]]``) checked against ``keys``: (label for messages, values) each."""
    out = []
    for label, d in array_of_tables(raw, name, keys, fail):
        kw = {}
        for key, check in keys.items():
            if key not in d:
                if key in optional:
                    kw[key] = optional[key]
                    continue
                raise fail(f"{label} {key}", "is required")
            try:
                kw[key] = check(d[key])
            except Rule as r:
                raise fail(f"{label} {key}", str(r)) from r
        out.append((label, kw))
    return out


def _parse_stations(raw: Any, fail: Callable[[str, str], ConfigError]) -> tuple[Station, ...]:
    out: list[Station] = []
    for label, kw in _tables(raw, "stations", STATION_KEYS, STATION_OPTIONAL, fail):
        kw["name"] = kw["name"].strip()
        if not kw["name"] or len(kw["name"]) > 64:
            raise fail(f"{label} name", "must be 1 to 64 characters")
        if any(x.name == kw["name"] for x in out):
            raise fail(f"{label} name", f"must be unique ({kw['name']!r} is used twice)")
        kw["station_name"], kw["institution_name"] = kw["station_name"].strip(), kw["institution_name"].strip()
        if any(x.ae_title == kw["ae_title"] and x.station_name == kw["station_name"]
               and x.institution_name == kw["institution_name"] for x in out):
            raise fail(f"{label} ae_title", f"{kw['ae_title']!r} with the same station_name and institution_name "
                       "is already another station: add station_name or institution_name to tell them apart")
        out.append(Station(**kw))
    return tuple(out)

