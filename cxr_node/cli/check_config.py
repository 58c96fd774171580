"""``cxr-node check-config``: validate the config file and print the effective settings.

Reads the file only: it creates nothing and does not need the database.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check-config", parents=[common],
                       help="validate the config file and print the effective settings",
                       description="Validate the config file (exit 2 naming the key and the rule) and "
                       "print the effective settings. Warns, still exiting 0, when no [[destinations]] "
                       "are configured, when the node accepts any AE title from any host, and when the web console "
                       "would serve plain HTTP beyond loopback.")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:
    from sqlalchemy.engine import make_url

    from cxr_node.config import destinations_warning, exposure_warning, web_warning

    n = settings.node
    where = settings.source or "built-in defaults"
    over = "".join(f" (over {b})" for b in settings.extends)
    out.write(f"configuration OK: {where}{over}\n")
    out.write(f"  node        {n.ae_title} on {n.host}:{n.port} (max PDU {n.max_pdu})\n")
    out.write(f"  calling AEs {', '.join(n.allowed_calling_aets) or 'any'}\n")
    out.write(f"  hosts       {', '.join(map(str, n.allowed_hosts)) or 'any'}\n")
    kept = "spool, outbox, database" if settings.database.url.startswith("sqlite:") else "spool, outbox"
    out.write(f"  data_dir    {settings.storage.data_dir}  (the data lives here: {kept}"
              + (f"; a relative data_dir is relative to {settings.source.parent}, so a copy of this file "
                 "elsewhere points at other data" if settings.source and not settings.extends else
                 "; a relative data_dir is relative to the directory of the file that sets it" if settings.source
                 else "") + ")\n")
    out.write(f"  database    {make_url(settings.database.url).render_as_string(hide_password=True)}\n")
    out.write(f"  quiet       {settings.study.quiet_seconds:g} s\n")
    if not settings.database.url.startswith("sqlite:"):
        f = settings.fleet
        out.write(f"  fleet       lease {f.lease_seconds:g} s renewed every {f.heartbeat_seconds:g} s; every node on this "
                  "database must share this data_dir (NFS or a shared volume: docs/fleet.md)\n")
    out.write(f"  model       {settings.model.checkpoint} (device {settings.model.device})\n")
    e = settings.eligibility
    out.write(f"  eligible    body parts {', '.join(e.body_parts)}; views {', '.join(e.views)}; "
              f"pixel checks (lung fields, training distribution) {'on' if e.check_pixels else 'OFF'}\n")
    for d in settings.destinations:
        auth = f", {d.auth} credentials from {d.secret_file or '$' + d.secret_env}" if d.auth != "none" else ""
        where = f"DICOMweb {d.where}" if d.kind == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}"
        out.write(f"  destination {d.name}: {where}{auth}\n")
    for n in settings.notifications:
        out.write(f"  notify      {n.name}: {n.kind} {n.where} (urgent studies, and corrections)\n")
    triggers = ", ".join(settings.triage.triggers) or "the model's own critical outputs"
    out.write(f"  triggers    {triggers}"
              " (outputs that may raise a study to urgent)\n")
    w = settings.web
    out.write(f"  web console {'https' if w.tls else 'http'}://{w.host}:{w.port} (`cxr-node web`; sessions end "
              f"after {w.idle_minutes:g} min idle)\n")
    for st in settings.stations:
        refine = ", ".join(f"{k} {v}" for k, v in (("StationName", st.station_name),
                                                  ("InstitutionName", st.institution_name)) if v)
        out.write(f"  station     {st.name}: calling AE {st.ae_title}{' (' + refine + ')' if refine else ''}, "
                  f"{st.mode}\n")
    if settings.onboarding is not None:
        out.write(f"  new station {settings.onboarding.new_stations} (stations not listed in [[stations]])\n")
    warning = destinations_warning(settings)
    if warning:
        out.write("  destination none\n")
    # the settings first, whole lines, then the warnings (`check-config 2>&1 | cat` keeps that order)
    out.flush()
    from cxr_node.config.channels import file_warnings

    for w in (warning, exposure_warning(settings), web_warning(settings),
              *file_warnings((*settings.destinations, *settings.notifications))):
        if w:
            sys.stderr.write(f"cxr-node: warning: {w}\n")
    sys.stderr.flush()
    return 0
