"""The console's shared parts: the state one console process holds (:class:`Console`), the guard
every page goes through (:func:`guarded`: session, CSRF, role), the security-header middleware,
and the small formatting helpers the templates use.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import utcnow
from cxr_node.db.session import Database
from cxr_node.logs import PerKeyRate
from cxr_node.web import images
from cxr_node.web.auth import SESSION_COOKIE, Session, Sessions, same

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent  # cxr_node/web: templates/ and static/
AUDIT_PAGE = 200
EXPORT_LIMIT = 100_000
#: Bodies larger than this are refused (413): every form here is small.
MAX_BODY = 256 * 1024
#: A worklist search for the same patient ID by the same user is audited once in this many seconds
#: (the page refreshes itself every 20 s).
SEARCH_AUDIT_SECONDS = 600
#: The security headers every response carries.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class Console:
    """The state one console process holds: settings, database, sessions, image cache, model facts."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.sessions = Sessions(db, settings.web.idle_minutes, settings.web.session_hours)
        self.images = images.ImageCache()
        self.started = time.monotonic()
        self._model: dict[str, Any] | None = None
        self._model_lock = threading.Lock()
        self._chain: tuple[float, dict[str, Any]] | None = None
        self._chain_lock = threading.Lock()
        self._searches = PerKeyRate(SEARCH_AUDIT_SECONDS)
        env = Jinja2Templates(directory=str(HERE / "templates")).env
        env.autoescape = True
        env.globals["nav"] = NAV
        env.filters["pct"] = lambda p: "-" if p is None else f"{100 * float(p):.1f}%"
        env.filters["when"] = _when
        env.filters["short_uid"] = _short_uid
        self.templates = Jinja2Templates(env=env)

    # ------------------------------------------------------------------------------ helpers

    def page(self, request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
        return self.templates.TemplateResponse(request, name, {"request": request, **ctx}, status_code=status)

    def record(self, event: str, sess: Session, host: str, **fields: Any) -> None:
        detail = {"user": sess.user.name, "role": sess.user.role, **fields.pop("detail", {})}
        with self.db.transaction() as s:
            audit.record(s, event, host=host[:64], detail=detail, **fields)

    def _first_in_a_while(self, key: tuple[str, ...]) -> bool:
        """True (and remembered) unless ``key`` was seen in the last SEARCH_AUDIT_SECONDS."""
        return self._searches.take(key) is not None

    def searched(self, sess: Session, host: str, patient_id: str, matches: int) -> None:
        """Audit a worklist search by patient ID (once per user and ID in SEARCH_AUDIT_SECONDS)."""
        if self._first_in_a_while(("search", sess.user.name, patient_id)):
            self.record("web.worklist_searched", sess, host, patient_id=patient_id, detail={"matches": matches})

    def viewed(self, sess: Session, host: str, study_uid: str, patient_id: str | None, via: str) -> None:
        """Audit a study view: every opening of its page; an image fetched without the page (a
        script, a bookmarked image URL) once per session and study in SEARCH_AUDIT_SECONDS."""
        if via == "page":
            self._first_in_a_while(("view", sess.token_id, study_uid))
        elif not self._first_in_a_while(("view", sess.token_id, study_uid)):
            return
        self.record("web.study_viewed", sess, host, study_uid=study_uid, patient_id=patient_id,
                    detail={"via": via})

    def chain_state(self, force: bool = False) -> dict[str, Any]:
        """The audit chain's verify result, recomputed when older than a minute (or ``force``)."""
        with self._chain_lock:
            if self._chain and not force and time.monotonic() - self._chain[0] < 60:
                return self._chain[1]
            t0 = time.perf_counter()
            with self.db.session() as s:
                rep = audit.verify_chain(s)
            state = {"ok": rep.ok, "rows": rep.rows, "problem": rep.problem, "first_bad_id": rep.first_bad_id,
                     "checked_at": utcnow().isoformat(timespec="seconds").replace("+00:00", "Z"),
                     "seconds": round(time.perf_counter() - t0, 2)}
            self._chain = (time.monotonic(), state)
            return state

    def model_facts(self) -> dict[str, Any]:
        """The configured model's metadata and hashes, read once (loading torch takes a while)."""
        with self._model_lock:
            if self._model is None:
                self._model = _model_facts(self.settings)
            return self._model


NAV = (("/", "Worklist", "view"), ("/audit", "Audit", "operations"), ("/outbox", "Outbox", "operations"),
       ("/stations", "Stations", "view"), ("/model", "Model", "view"), ("/status", "Status", "view"))


def _when(t: str | None) -> str:
    """An ISO time from the database (UTC, ``...Z``) as '2026-12-02 01:45:12 UTC'."""
    if not t:
        return "-"
    return t.replace("T", " ").replace("Z", " UTC").replace("+00:00", " UTC")


def _short_uid(uid: str | None, among: Any = (), keep: int = 8) -> str:
    """A long UID shortened for a table: its first ``keep`` characters and as many of its last
    (``keep`` at least) as tell it apart from every other UID in ``among`` (the page's UIDs):
    ``1.3.6.1.…185059.5457`` and ``1.3.6.1.…182059.5457``, not ``1.3.6.1.…059.5457`` twice."""
    uid = uid or ""
    others = {u for u in among or () if u and u != uid}
    tail = keep
    while tail < len(uid) and any(o.endswith(uid[-tail:]) for o in others):
        tail += 1
    return uid if len(uid) <= keep + tail + 3 else f"{uid[:keep]}\u2026{uid[-tail:]}"


def client_host(request: Request) -> str:
    return request.client.host if request.client else "-"


def _file_sha256(path: Path | None) -> str | None:
    import hashlib

    if path is None or not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_facts(settings: Settings) -> dict[str, Any]:
    from cxr_node.config import BUNDLED_CHECKPOINT, BUNDLED_LUNG_CHECKPOINT
    from cxr_node.errors import CheckpointError

    ckpt = Path(settings.model.checkpoint)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "bundled": ckpt == BUNDLED_CHECKPOINT, "error": None,
                           "meta": {}, "files": []}
    try:
        from cxr_node.model.checkpoint import read_checkpoint

        ck = read_checkpoint(ckpt)
        meta = ck["meta"]
        out["meta"] = {k: v for k, v in sorted(meta.items())
                       if isinstance(v, (str, int, float, bool)) or k in ("labels", "thresholds", "critical_labels")}
        out["weights_sha256"] = ck["sha256"]
        out["version"] = meta.get("version")
    except CheckpointError as e:
        out["error"] = str(e)
    ood = settings.model.ood_reference or ckpt.with_name(ckpt.name.removesuffix(".pt") + ".ood.pt")
    lung = settings.model.lung_checkpoint or BUNDLED_LUNG_CHECKPOINT
    for label, p in (("classifier", ckpt), ("out-of-domain reference", ood), ("lung segmenter", lung)):
        out["files"].append({"what": label, "name": p.name, "sha256": _file_sha256(p),
                             "bytes": p.stat().st_size if p.is_file() else None})
    card = ckpt.with_name("MODEL_CARD.md") if out["bundled"] else ckpt.with_suffix(".md")
    out["card"] = card.read_text(encoding="utf-8") if card.is_file() else None
    out["plots"] = sorted(PLOTS) if out["bundled"] and all(p.is_file() for p in PLOTS.values()) else []
    return out


#: The bundled model's evaluation plots, where a source checkout has them (by fixed name only).
_RESULTS = HERE.parents[1] / "training" / "results" / "densenet121-128-v2" / "test"
PLOTS = {"roc": _RESULTS / "roc.png", "confusion": _RESULTS / "confusion.png",
         "reliability": _RESULTS / "reliability.png"}


# ---------------------------------------------------------------------------------- guards


def guarded(permission: str = "view", api: bool = False) -> Callable:
    """Wrap a synchronous handler ``fn(console, request, sess, form)``: a session is required
    (else a redirect to /login, or 401 for the API), a POST must carry the session's CSRF token
    (else 403), and the user's role must allow ``permission`` (else 403). The handler runs in a
    worker thread (it uses the database)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            console: Console = request.app.state.console
            sess = await run_in_threadpool(console.sessions.resolve, request.cookies.get(SESSION_COOKIE),
                                           client_host(request), not request.query_params.get("refresh"))
            if sess is None:
                if api:
                    return JSONResponse({"error": "log in first (POST /login)"}, status_code=401)
                if request.method != "GET":
                    return RedirectResponse("/login", status_code=303)
                nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/login?" + urlencode({"next": nxt}), status_code=303)
            form = None
            if request.method == "POST":
                form = await request.form(max_files=0, max_fields=1000)
                if not same(form.get("csrf_token"), sess.csrf):
                    return forbidden(console, request, sess, "Forbidden: the form's security token is missing or "
                                     "wrong; reload the page and try again.", api)
            if not sess.user.may(permission):
                return forbidden(console, request, sess, f"Forbidden: the {sess.user.role} role may not "
                                 f"{PERMISSION_WORDS.get(permission, 'do this')}. Ask an admin if you need it.", api)
            return await run_in_threadpool(fn, console, request, sess, form)

        return endpoint

    return wrap


#: What each permission lets a user do, for the page that says a role may not.
PERMISSION_WORDS = {"view": "see the worklist and the studies",
                    "operations": "see the audit trail or the outbox",
                    "outbox": "retry or purge the outbox",
                    "feedback": "store readers' labels"}


def forbidden(console: "Console", request: Request, sess: Any, why: str, api: bool = False) -> Response:
    """403 as a page of the console (its menu, and a way back), or as JSON for the API."""
    if api:
        return JSONResponse({"error": why}, status_code=403)
    return console.page(request, "message.html", {"user": sess.user if sess else None,
                                                  "csrf": sess.csrf if sess else None, "title": "Not allowed",
                                                  "message": why, "back": safe_back(request)}, status=403)


def safe_back(request: Request) -> str:
    """The page the user came from (the Referer's path, on this console only), else the worklist."""
    from urllib.parse import urlsplit

    ref = urlsplit(request.headers.get("referer", ""))
    if ref.netloc and ref.netloc != request.url.netloc:
        return "/"
    path = ref.path + (f"?{ref.query}" if ref.query else "")
    return safe_next(path) if path and path != request.url.path else "/"


def safe_next(value: str | None) -> str:
    """Only a local path is followed after login: never //host, a scheme, a backslash, or a
    character a browser drops (a tab in "/<tab>/host" would make it //host)."""
    if value and len(value) < 2000 and all(32 < ord(c) < 127 for c in value) and value.startswith("/") \
            and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


# ---------------------------------------------------------------------------------- middleware


async def _bad_request(scope, receive, send) -> None:
    await PlainTextResponse("Request body incomplete.", status_code=400)(scope, receive, send)


class _BodyTooLarge(Exception):
    """A streamed (chunked) request body went past :data:`MAX_BODY`."""


class SecurityHeaders:
    """Adds :data:`HEADERS` to every response, and ``Cache-Control: no-store`` unless it has one
    (pages show patient IDs: no copy in shared caches or the browser's disk cache). Logs one line
    per request: method, path (never the query, which may hold a patient ID), status, time."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        too_large = PlainTextResponse(f"Request body too large (at most {MAX_BODY} bytes).", status_code=413)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await too_large(scope, receive, send)
        received = [0]
        note = ""

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > MAX_BODY:
                    raise _BodyTooLarge
            return message

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                if scope.get("scheme") == "https":
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive_limited, send_with_headers)
        except _BodyTooLarge:
            if status[0]:  # pragma: no cover - every handler reads its form before it answers
                raise
            await too_large(scope, receive, send_with_headers)
        except ClientDisconnect:  # the client went away before its body came (issue 30): said in the
            # request's one line, no traceback; the 400 goes nowhere if the connection is gone already
            note = f" (the client went away before its {int(length)}-byte body arrived)"
            if not status[0]:
                await _bad_request(scope, receive, send_with_headers)
        finally:
            log.info("%s %s %d %.0fms%s", scope.get("method"), scope.get("path"), status[0],
                     1000 * (time.perf_counter() - t0), note)
