"""Configuration reload without a restart (SIGHUP, ``systemctl reload cxr-node``).

The daemon reads its config file again and takes, at once: destinations, stations and their modes,
the allow-lists (``[node] allowed_calling_aets``, ``allowed_hosts``), eligibility, the study and
outbox rules, onboarding, retention days and the logging level. Settings the running process
cannot change (its port, AE title, the data directory, the database, TLS files, the model, the
metrics port, the receiver's limits and timeouts) are named in a warning and kept until a restart.
A file that does not validate changes nothing: the daemon logs why and goes on with what it has.
Each reload is audited as ``config.reloaded`` (what changed, what waits for a restart, and what
the daemon now runs with, which ``cxr-node status`` shows), a refused one as
``config.reload_failed``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from cxr_node import config
from cxr_node.audit import trail as audit
from cxr_node.config import Settings, channels
from cxr_node.db.session import Database
from cxr_node.errors import ConfigError
from cxr_node.onboarding import stations

log = logging.getLogger(__name__)

#: ``[node]`` keys the running receiver reads on every association.
NODE_LIVE = ("allowed_calling_aets", "allowed_hosts", "drain_seconds")
#: Sections that only a restart changes (the process holds their sockets, files, model, engine).
RESTART_SECTIONS = ("storage", "database", "tls", "model", "metrics", "fleet")
#: Read by ``cxr-node web``, not by the daemon: a change is named so that the web console is restarted.
WEB_SECTION = "web"


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v):
        return {k: _plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)  # ip networks


def _keys(s: Settings) -> dict[str, Any]:
    """Every setting as ``"[section] key"`` -> a JSON-able value (destinations and stations apart)."""
    out = {}
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if dataclasses.is_dataclass(v):
            for g in dataclasses.fields(v):
                out[f"[{f.name}] {g.name}"] = _plain(getattr(v, g.name))
    return out


def _by_name(items: tuple) -> dict[str, Any]:
    return {x.name: _plain(x) for x in items}


def _list_diff(old: tuple, new: tuple) -> dict[str, list[str]]:
    a, b = _by_name(old), _by_name(new)
    d = {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
         "changed": sorted(k for k in set(a) & set(b) if a[k] != b[k])}
    return {k: v for k, v in d.items() if v}


def needs_restart(key: str) -> bool:
    section, name = key[1:].split("] ", 1)
    if section == "node":
        return name not in NODE_LIVE
    return section in RESTART_SECTIONS or section == WEB_SECTION


def merge(old: Settings, new: Settings) -> tuple[Settings, dict[str, Any], list[str]]:
    """What the daemon runs with after reading ``new``: ``new`` except what needs a restart, which
    stays as in ``old``. Returns (settings, what changed, keys kept until a restart)."""
    a, b = _keys(old), _keys(new)
    changed = {k: [a[k], b[k]] for k in a if a[k] != b[k]}
    if (old.retention.days > 0) != (new.retention.days > 0):  # the retention job exists or not from start-up
        kept_retention = ["[retention] days"]
    else:
        kept_retention = []
    kept = sorted(k for k in changed if needs_restart(k)) + kept_retention
    node = dataclasses.replace(old.node, **{k: getattr(new.node, k) for k in NODE_LIVE})
    merged = dataclasses.replace(
        new, node=node, **{sec: getattr(old, sec) for sec in RESTART_SECTIONS + (WEB_SECTION,)},
        retention=old.retention if kept_retention else new.retention)
    live = {k: v for k, v in changed.items() if k not in kept}
    for name in ("destinations", "stations", "notifications"):
        d = _list_diff(getattr(old, name), getattr(new, name))
        if d:
            live[f"[[{name}]]"] = d
    return merged, live, kept


def running_summary(settings: Settings) -> dict[str, Any]:
    """What ``cxr-node status`` shows as the running daemon's configuration (in the audit rows
    ``node.started`` and ``config.reloaded``)."""
    n = settings.node
    return {"pid": os.getpid(), "config": str(settings.source) if settings.source else None,
            "destinations": [channels.summary(d) for d in settings.destinations],
            "notifications": [channels.summary(d) for d in settings.notifications],
            "triggers": list(settings.triage.triggers),
            "stations": [{"name": s.name, "ae_title": s.ae_title, "mode": s.mode} for s in settings.stations],
            "new_stations": settings.onboarding.new_stations if settings.onboarding else None,
            "allowed_calling_aets": list(n.allowed_calling_aets), "allowed_hosts": [str(h) for h in n.allowed_hosts],
            "logging": settings.logging.level, "quiet_seconds": settings.study.quiet_seconds,
            "release_grace_seconds": settings.study.release_grace_seconds if settings.study.complete_on_release
            else None}


class Reloader:
    """Holds the daemon's current settings and hands a reloaded copy to every part that reads them
    (receiver, outbox, processor, scheduler)."""

    def __init__(self, settings: Settings, db: Database, *parts: Any) -> None:
        self.settings = settings
        self.db = db
        self.parts = [p for p in parts if p is not None]

    def reload(self) -> bool:
        """Read the file again and apply it; False (nothing changed, logged and audited) when it
        does not validate."""
        source = self.settings.source
        if source is None:
            log.warning("reload requested, but the daemon runs on the built-in defaults (no --config and no "
                        "$%s): nothing to read", config.ENV_VAR)
            return False
        try:
            new = config.load(source)
        except ConfigError as e:
            log.error("configuration NOT reloaded, still running with the previous one: %s", e)
            with self.db.transaction() as s:
                audit.record(s, "config.reload_failed", "failure", reason=str(e)[:500], detail={"config": str(source)})
            return False
        merged, changed, kept = merge(self.settings, new)
        self.settings = merged
        for part in self.parts:
            if hasattr(part, "reconfigure"):
                part.reconfigure(merged)
            else:
                part.settings = merged
        logging.getLogger().setLevel(merged.logging.level)
        mode_changes = stations.sync(merged, self.db)  # audits station.mode
        with self.db.transaction() as s:
            audit.record(s, "config.reloaded", detail={"config": str(source), "changed": changed,
                                                       "kept_until_restart": kept,
                                                       "running": running_summary(merged)})
        log.info("configuration reloaded from %s: %s", source,
                 "; ".join(_describe(k, v) for k, v in changed.items()) or "nothing changed")
        log.debug("running configuration now: %s", running_summary(merged))
        for name, old_mode, new_mode in mode_changes:
            log.info("station %s: %s -> %s", name, old_mode, new_mode)
        if kept:
            log.warning("configuration reload: %s changed in %s but need(s) a restart to take effect; the daemon "
                        "keeps the running value(s) until then%s", ", ".join(kept), source,
                        " ([web] is read by `cxr-node web`: restart that)" if any(k.startswith("[web]") for k in kept)
                        else "")
        return True


def _describe(key: str, value: Any) -> str:
    if key.startswith("[["):
        return f"{key} " + ", ".join(f"{what} {', '.join(names)}" for what, names in value.items())
    return f"{key} {value[0]!r} -> {value[1]!r}"
