"""Console pages: the model, the node's status and the stations."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from cxr_node.web import queries
from cxr_node.web.auth import Session
from cxr_node.web.console import PLOTS, Console, guarded

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- model, status, stations


@guarded()
def model_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    return console.page(request, "model.html", {"user": sess.user, "csrf": sess.csrf, "m": console.model_facts()})


@guarded()
def model_plot(console: Console, request: Request, sess: Session, form: Any) -> Response:
    name = request.path_params["name"].removesuffix(".png")
    path = PLOTS.get(name)
    if path is None or not path.is_file() or not console.model_facts()["plots"]:
        return PlainTextResponse("Not found", status_code=404)
    return Response(path.read_bytes(), media_type="image/png")


@guarded()
def status_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    from cxr_node.ops import status

    st = None
    error = None
    try:
        st = status.collect(console.settings, console.db)
    except SQLAlchemyError as e:
        from cxr_node.errors import db_error_text

        error = db_error_text(e)
    data_dir = console.settings.storage.data_dir
    usage = shutil.disk_usage(data_dir) if data_dir.exists() else None
    health = {
        "database": "ok" if st else f"unreachable: {error}",
        "daemon": ("running" if st and st["running"] else "not running") if st else "unknown",
        "console_uptime_seconds": round(time.monotonic() - console.started),
        "disk_free_gib": round(usage.free / 2**30, 1) if usage else None,
        "disk_used_percent": round(100 * usage.used / usage.total, 1) if usage else None,
        "tls": console.settings.web.tls,
    }
    if request.query_params.get("format") == "json":
        return JSONResponse({"status": st, "health": health})
    return console.page(request, "status.html", {"user": sess.user, "csrf": sess.csrf, "st": st, "health": health})


@guarded()
def stations_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """Each sending station: mode, drift state and what moved, site calibrations (history), and local
    performance from the readers' labels (``cxr-node performance --station``), with intervals."""
    critical = list((console.model_facts().get("meta") or {}).get("critical_labels") or [])
    with console.db.session() as s:
        stations = queries.stations_overview(s, critical)
    return console.page(request, "stations.html", {"user": sess.user, "csrf": sess.csrf, "stations": stations,
                                                   "plots": STATION_PLOTS})


STATION_PLOTS = ("roc", "reliability", "confusion")


@guarded()
def station_plot(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """A station's ROC, reliability or confusion plot from its labelled films, rendered now."""
    import tempfile

    from cxr_node.onboarding import performance

    name, kind = request.path_params["station"], request.path_params["name"].removesuffix(".png")
    if kind not in STATION_PLOTS or not request.path_params["name"].endswith(".png"):
        return PlainTextResponse("Not found", status_code=404)
    critical = list((console.model_facts().get("meta") or {}).get("critical_labels") or [])
    with console.db.session() as s:
        if name not in queries.station_names(s):
            return PlainTextResponse("Not found", status_code=404)
        films = performance.labelled_films(s, station=name)
    if not films:
        return PlainTextResponse("Not found: no labelled films from this station yet", status_code=404)
    report = performance.compute(films, list(films[0].probabilities), critical, n_boot=0)
    with tempfile.TemporaryDirectory(prefix="cxr-web-plot-") as tmp:
        performance.write_plots(report, Path(tmp))
        png = (Path(tmp) / f"{kind}.png").read_bytes()
    return Response(png, media_type="image/png")
