"""The console as a Starlette application: ``create_app(settings, db)``.

Every page but ``/login``, ``/healthz`` and the static files needs a session; without one a page
redirects to ``/login`` (``/api/...`` answers 401). Every POST carries the session's CSRF token,
checked before anything else; actions check the user's role (:mod:`cxr_node.web.users`).
Opening a study, reading or exporting the audit trail and searching by patient ID are audited.

URLs name studies and images only by their DICOM UIDs, validated as UIDs and looked up in the
database (an image must belong to the study in its URL); no file path or row id is ever taken
from a URL.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cxr_node.config import Settings
from cxr_node.db.session import Database
from cxr_node.web.console import HERE, Console, SecurityHeaders
from cxr_node.web.routes.login import healthz, login_page, login_submit, logout
from cxr_node.web.routes.model import model_page, model_plot, station_plot, stations_page, status_page
from cxr_node.web.routes.operations import audit_page, outbox_page, outbox_purge, outbox_retry
from cxr_node.web.routes.studies import api_studies, study_feedback, study_image, study_page, worklist_page


def create_app(settings: Settings, db: Database) -> Starlette:
    routes = [
        Route("/healthz", healthz),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", worklist_page),
        Route("/api/studies", api_studies),
        Route("/study/{study_uid}", study_page),
        Route("/study/{study_uid}/image/{name}", study_image),
        Route("/study/{study_uid}/feedback", study_feedback, methods=["POST"]),
        Route("/audit", audit_page),
        Route("/outbox", outbox_page),
        Route("/outbox/retry", outbox_retry, methods=["POST"]),
        Route("/outbox/purge", outbox_purge, methods=["POST"]),
        Route("/model", model_page),
        Route("/model/plot/{name}", model_plot),
        Route("/status", status_page),
        Route("/stations", stations_page),
        Route("/stations/{station}/plot/{name}", station_plot),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.console = Console(settings, db)
    app.add_middleware(SecurityHeaders)
    return app
