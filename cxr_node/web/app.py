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

import csv
import functools
import io
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import ImageResult, Instance, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import ConfigError
from cxr_node.web import images, queries
from cxr_node.web.auth import LOGIN_COOKIE, SESSION_COOKIE, LoginRefused, Session, Sessions, new_token, same

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
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
        self._searches: dict[tuple[str, str], float] = {}
        self._searches_lock = threading.Lock()
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
        now = time.monotonic()
        with self._searches_lock:
            if now - self._searches.get(key, -1e9) < SEARCH_AUDIT_SECONDS:
                return False
            self._searches[key] = now
            if len(self._searches) > 10_000:
                self._searches = {k: t for k, t in self._searches.items() if now - t < SEARCH_AUDIT_SECONDS}
            return True

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


def _short_uid(uid: str | None, keep: int = 8) -> str:
    """A long UID shortened for a table: its first and last ``keep`` characters."""
    uid = uid or ""
    return uid if len(uid) <= 2 * keep + 3 else f"{uid[:keep]}\u2026{uid[-keep:]}"


def _host(request: Request) -> str:
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
                                           _host(request), not request.query_params.get("refresh"))
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
                    return PlainTextResponse("Forbidden: the form's security token is missing or wrong; reload "
                                             "the page and try again.", status_code=403)
            if not sess.user.may(permission):
                return PlainTextResponse(f"Forbidden: the {sess.user.role} role may not do this.", status_code=403)
            return await run_in_threadpool(fn, console, request, sess, form)

        return endpoint

    return wrap


def _safe_next(value: str | None) -> str:
    """Only a local path is followed after login: never //host, a scheme, a backslash, or a
    character a browser drops (a tab in "/<tab>/host" would make it //host)."""
    if value and len(value) < 2000 and all(32 < ord(c) < 127 for c in value) and value.startswith("/") \
            and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


# ---------------------------------------------------------------------------------- login


async def login_page(request: Request) -> Response:
    console: Console = request.app.state.console
    token = new_token()
    resp = console.page(request, "login.html", {"csrf": token, "next": _safe_next(request.query_params.get("next")),
                                                "error": None, "user": None})
    _set_cookie(resp, console, request, LOGIN_COOKIE, token, max_age=3600)
    return resp


async def login_submit(request: Request) -> Response:
    console: Console = request.app.state.console
    form = await request.form(max_files=0, max_fields=10)
    if not same(form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE)):
        return PlainTextResponse("Forbidden: the login form's security token is missing or wrong; reload the "
                                 "login page and try again.", status_code=403)
    name, password = str(form.get("username") or ""), str(form.get("password") or "")
    nxt = _safe_next(str(form.get("next") or "/"))
    try:
        token, _ = await run_in_threadpool(console.sessions.login, name, password[:1024], _host(request))
    except LoginRefused as e:
        fresh = new_token()
        status = 429 if e.retry_after else 401
        resp = console.page(request, "login.html", {"csrf": fresh, "next": nxt, "error": str(e), "user": None},
                            status=status)
        if e.retry_after:
            resp.headers["Retry-After"] = str(int(e.retry_after) + 1)
        _set_cookie(resp, console, request, LOGIN_COOKIE, fresh, max_age=3600)
        return resp
    resp = RedirectResponse(nxt, status_code=303)
    _set_cookie(resp, console, request, SESSION_COOKIE, token,
                max_age=int(console.settings.web.session_hours * 3600))
    resp.delete_cookie(LOGIN_COOKIE, path="/")
    return resp


def _set_cookie(resp: Response, console: Console, request: Request, name: str, value: str, max_age: int) -> None:
    # https in the URL: TLS here, or a trusted reverse proxy's X-Forwarded-Proto ([web] trusted_proxies)
    resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                    secure=console.settings.web.tls or request.url.scheme == "https")


@guarded()
def logout(console: Console, request: Request, sess: Session, form: Any) -> Response:
    console.sessions.end(sess.token_id, _host(request), "logged out", sess.user.name)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


async def healthz(request: Request) -> Response:
    """Liveness for monitors: no session needed, nothing about patients or studies."""
    console: Console = request.app.state.console

    def check() -> bool:
        from sqlalchemy import text

        try:
            with console.db.session() as s:
                s.execute(text("select 1"))
            return True
        except SQLAlchemyError:
            return False

    ok = await run_in_threadpool(check)
    return JSONResponse({"status": "ok" if ok else "unavailable", "database": "ok" if ok else "unreachable"},
                        status_code=200 if ok else 503)


# ---------------------------------------------------------------------------------- worklist


def _worklist(console: Console, request: Request, sess: Session) -> tuple[queries.WorklistFilter, dict] | Response:
    try:
        f = queries.WorklistFilter.from_query(request.query_params)
    except queries.BadFilter as e:
        return PlainTextResponse(f"Bad filter: {e}", status_code=400)
    with console.db.session() as s:
        data = queries.worklist(s, f, settings=console.settings)
        data["station_choices"] = queries.stations(s)
    if f.patient_id:
        console.searched(sess, _host(request), f.patient_id, data["total"])
    return f, data


@guarded()
def worklist_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    got = _worklist(console, request, sess)
    if isinstance(got, Response):
        return got
    f, data = got
    ctx = {"user": sess.user, "csrf": sess.csrf, "f": f, "data": data, "states": queries.studies.STATES,
           "priorities": queries.PRIORITIES, "qs": lambda **kw: urlencode(f.params(**kw))}
    if request.query_params.get("refresh"):
        return console.page(request, "worklist_rows.html", ctx)
    return console.page(request, "worklist.html", ctx)


@guarded(api=True)
def api_studies(console: Console, request: Request, sess: Session, form: Any) -> Response:
    got = _worklist(console, request, sess)
    if isinstance(got, Response):
        return JSONResponse({"error": got.body.decode()}, status_code=got.status_code)
    f, data = got
    data.pop("station_choices", None)
    data["filter"] = f.params()
    return JSONResponse(data)


# ---------------------------------------------------------------------------------- study


@guarded()
def study_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    uid = request.path_params["study_uid"]
    if not queries.valid_uid(uid):
        return _not_found(console, request, sess, "not a study UID")
    with console.db.session() as s:
        data = queries.study(s, console.settings, uid)
        if data is not None:
            data["feedback"] = queries.study_feedback(s, uid)
    if data is None:
        return _not_found(console, request, sess, "no such study on this node")
    console.viewed(sess, _host(request), uid, data["study"]["patient_id"], "page")
    return console.page(request, "study.html", {"user": sess.user, "csrf": sess.csrf,
                                                "done": request.query_params.get("done"), **data})


@guarded(permission="feedback")
def study_feedback(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """The reader's label for the study or one of its films (cxr_node.onboarding.feedback.add_label; audited as
    feedback.added with the user as reader, superseding the label in force)."""
    from cxr_node.onboarding.feedback import FeedbackError, add_label

    uid = request.path_params["study_uid"]
    if not queries.valid_uid(uid):
        return _not_found(console, request, sess, "not a study UID")
    sop = (form.get("sop_instance_uid") or "").strip() or None
    if sop is not None and not queries.valid_uid(sop):
        return PlainTextResponse("Bad request: not a film UID.", status_code=400)
    try:
        out = add_label(console.db, uid, str(form.get("label") or ""), reader=sess.user.name, sop_instance_uid=sop,
                        source="web")
    except FeedbackError as e:
        done = f"Not stored: {e}."
    else:
        what = f"film {sop}" if sop else "the study"
        done = (f"{out.duplicate_of.label} was already the label in force for {what}: nothing changed."
                if out.feedback is None else
                f"Stored {out.feedback.label} for {what}" + (f" (it supersedes {out.superseded.label})."
                                                              if out.superseded else "."))
    return RedirectResponse(f"/study/{uid}?" + urlencode({"done": done}) + "#feedback", status_code=303)


def _not_found(console: Console, request: Request, sess: Session, why: str) -> Response:
    return console.page(request, "message.html", {"user": sess.user, "csrf": sess.csrf, "title": "Not found",
                                                  "message": f"Not found: {why}."}, status=404)


@guarded()
def study_image(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """The overlay (a Secondary Capture of this study) or the film (an instance of this study) as PNG."""
    study_uid, name = request.path_params["study_uid"], request.path_params["name"]
    sop_uid = name.removesuffix(".png")
    if not name.endswith(".png") or not (queries.valid_uid(study_uid) and queries.valid_uid(sop_uid)):
        return PlainTextResponse("Not found", status_code=404)
    full = request.query_params.get("size") == "full"  # the full-size view; anything else: the page's size
    key = (study_uid, sop_uid, full)
    png = console.images.get(key)
    with console.db.session() as s:
        patient_id = s.scalar(select(Study.patient_id).where(Study.study_uid == study_uid))
    if png is None:
        path = None
        with console.db.session() as s:
            sc = s.scalar(select(ImageResult.id).where(ImageResult.study_uid == study_uid,
                                                       ImageResult.sc_sop_instance_uid == sop_uid).limit(1))
            if sc is not None:
                path = queries.result_file(console.settings, study_uid, sop_uid)
            else:
                inst = s.scalar(select(Instance).where(Instance.study_uid == study_uid,
                                                       Instance.sop_instance_uid == sop_uid,
                                                       Instance.removed_at.is_(None)))
                if inst is not None:
                    path = images.inside(console.settings.storage.spool_dir, inst.path)
        if path is None:
            return PlainTextResponse("Not found", status_code=404)
        try:
            png = images.render(path, images.FULL_SIDE if full else images.MAX_SIDE)
        except (OSError, ValueError, AttributeError, NotImplementedError, RuntimeError) as e:
            log.warning("cannot render %s of study %s: %s", sop_uid, study_uid, type(e).__name__)
            return PlainTextResponse("This image cannot be shown.", status_code=422)
        console.images.put(key, png)
    console.viewed(sess, _host(request), study_uid, patient_id, "image")
    return Response(png, media_type="image/png")  # no-store like the pages: the console's cache serves repeats


# ---------------------------------------------------------------------------------- audit


def _audit_query(request: Request) -> tuple[audit.AuditQuery, dict[str, Any]]:
    from cxr_node.cli.audit import parse_time

    q = request.query_params
    events = [e for e in q.getlist("event") if e]
    unknown = [e for e in events if e not in audit.EVENTS]
    if unknown:
        raise ConfigError(f"unknown event type {unknown[0]!r}")
    outcome = q.get("outcome") or None
    if outcome and outcome not in ("success", "failure", "warning"):
        raise ConfigError("outcome must be success, failure or warning")
    study = q.get("study") or None
    if study and not queries.valid_uid(study):
        raise ConfigError("study: not a UID")
    try:
        page = max(1, int(q.get("page") or 1))
    except ValueError:
        raise ConfigError("page must be a number")
    filters = {"since": q.get("since") or None, "until": q.get("until") or None, "study": study,
               "event": events, "calling_aet": (q.get("calling_aet") or None), "patient_id": q.get("patient_id") or None,
               "outcome": outcome}
    aq = audit.AuditQuery(
        since=parse_time(filters["since"], "since") if filters["since"] else None,
        until=parse_time(filters["until"], "until") if filters["until"] else None,
        study_uid=study, events=tuple(events), calling_aet=filters["calling_aet"],
        patient_id=filters["patient_id"], outcome=outcome, newest_first=True,
        limit=AUDIT_PAGE, offset=(page - 1) * AUDIT_PAGE)
    return aq, {**filters, "page": page}


@guarded(permission="operations")
def audit_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    try:
        aq, filters = _audit_query(request)
    except ConfigError as e:
        return PlainTextResponse(f"Bad filter: {e}", status_code=400)
    fmt = request.query_params.get("format") or "html"
    if fmt not in ("html", "csv", "json", "dicom-audit"):
        return PlainTextResponse("Bad format: html, csv, json or dicom-audit", status_code=400)
    shown = {k: v for k, v in filters.items() if v and k != "page"}
    if fmt != "html":
        from dataclasses import replace

        with console.db.session() as s:
            rows = audit.as_dicts(audit.query(s, replace(aq, newest_first=False, limit=EXPORT_LIMIT, offset=0)))
        console.record("web.audit_viewed", sess, _host(request), study_uid=aq.study_uid, patient_id=aq.patient_id,
                       detail={"format": fmt, "filters": shown, "rows": len(rows)})
        return _export(rows, fmt, console.settings.node.ae_title)
    with console.db.session() as s:
        rows = audit.as_dicts(audit.query(s, aq))
        total = audit.count(s, aq)
    chain = console.chain_state(force=bool(request.query_params.get("verify")))
    console.record("web.audit_viewed", sess, _host(request), study_uid=aq.study_uid, patient_id=aq.patient_id,
                   detail={"format": "html", "filters": shown, "page": filters["page"]})
    params = [(k, v) for k, v in filters.items() if v and k not in ("page", "event")] + \
        [("event", e) for e in filters["event"]]
    return console.page(request, "audit.html", {
        "user": sess.user, "csrf": sess.csrf, "rows": rows, "total": total, "filters": filters,
        "events": sorted(audit.EVENTS), "chain": chain, "page": filters["page"],
        "pages": max(1, -(-total // AUDIT_PAGE)), "qs": lambda **kw: urlencode(params + list(kw.items()))})


def _export(rows: list[dict[str, Any]], fmt: str, node_aet: str) -> Response:
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    buf = io.StringIO()
    if fmt == "json":
        json.dump(rows, buf, indent=1)
        media, ext = "application/json", "json"
    elif fmt == "csv":
        w = csv.DictWriter(buf, fieldnames=list(audit.FIELDS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else v) for k, v in r.items()})
        media, ext = "text/csv", "csv"
    else:
        from cxr_node.audit.atna import write_messages

        write_messages(rows, node_aet, buf)
        media, ext = "application/xml", "xml"
    return Response(buf.getvalue(), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="cxr-node-audit-{stamp}.{ext}"'})


# ---------------------------------------------------------------------------------- outbox


@guarded(permission="operations")
def outbox_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    state = request.query_params.get("state") or None
    if state and state not in ("pending", "sent", "dead"):
        return PlainTextResponse("Bad filter: state must be pending, sent or dead", status_code=400)
    try:
        page = max(1, int(request.query_params.get("page") or 1))
    except ValueError:
        return PlainTextResponse("Bad filter: page must be a number", status_code=400)
    with console.db.session() as s:
        data = queries.outbox(s, state, page)
    return console.page(request, "outbox.html", {"user": sess.user, "csrf": sess.csrf, "state": state, **data,
                                                 "message": request.query_params.get("done")})


def _ids(form: Any) -> list[int]:
    out = []
    for v in form.getlist("id"):
        try:
            out.append(int(v))
        except ValueError:
            continue
    return out[:10_000]


@guarded(permission="outbox")
def outbox_retry(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """Dead items (all, or the ones ticked) back to pending; a confirmation page first."""
    from cxr_node.outbox.queue import Outbox

    ids, all_dead = _ids(form), form.get("all_dead") == "1"
    if not ids and not all_dead:
        return RedirectResponse("/outbox?" + urlencode({"done": "Nothing selected to retry."}), status_code=303)
    if form.get("confirm") != "yes":
        what = "every dead item" if all_dead else f"{len(ids)} item(s)"
        return console.page(request, "confirm.html", {
            "user": sess.user, "csrf": sess.csrf, "action": "/outbox/retry", "title": "Retry sending",
            "question": f"Put {what} back to pending, to be sent again now?",
            "fields": [("id", str(i)) for i in ids] + ([("all_dead", "1")] if all_dead else [])})
    n = Outbox(console.settings, console.db).retry(ids, all_dead=all_dead, by=sess.user.name)
    return RedirectResponse("/outbox?" + urlencode({"done": f"{n} item(s) pending again."}), status_code=303)


@guarded(permission="outbox")
def outbox_purge(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """Sent and/or dead items (rows and files) removed; a confirmation page first."""
    from cxr_node.outbox.queue import Outbox

    states = [s for s in ("sent", "dead") if form.get(s) == "1"]
    if not states:
        return RedirectResponse("/outbox?" + urlencode({"done": "Say what to purge: sent and/or dead."}),
                                status_code=303)
    older = form.get("older_than") or ""
    try:
        days = float(older) if older else None
    except ValueError:
        return PlainTextResponse("older_than must be a number of days", status_code=400)
    if days is not None and not 0 <= days <= 36500:
        return PlainTextResponse("older_than must be from 0 to 36500 days", status_code=400)
    if form.get("confirm") != "yes":
        return console.page(request, "confirm.html", {
            "user": sess.user, "csrf": sess.csrf, "action": "/outbox/purge", "title": "Purge the outbox",
            "question": f"Delete every {' and '.join(states)} item{' older than %g days' % days if days else ''}, "
                        "rows and result files? This cannot be undone.",
            "fields": [(s, "1") for s in states] + ([("older_than", older)] if older else [])})
    n = Outbox(console.settings, console.db).purge(states, days, by=sess.user.name)
    return RedirectResponse("/outbox?" + urlencode({"done": f"{n} item(s) purged."}), status_code=303)


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


# ---------------------------------------------------------------------------------- the app


class _BodyTooLarge(Exception):
    """A streamed (chunked) request body went past :data:`MAX_BODY`."""


class SecurityHeaders:
    """Adds :data:`HEADERS` to every response, and ``Cache-Control: no-store`` unless it has one
    (pages show patient IDs: no copy in shared caches or the browser's disk cache). Logs one line
    per request: method, path (never the query, which may hold a patient ID), status, time."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        too_large = PlainTextResponse(f"Request body too large (at most {MAX_BODY} bytes).", status_code=413)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await too_large(scope, receive, send)
        received = [0]

        async def receive_limited():  # noqa: ANN202 - a chunked body has no Content-Length to check first
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > MAX_BODY:
                    raise _BodyTooLarge
            return message

        async def send_with_headers(message) -> None:  # noqa: ANN001
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
        finally:
            log.info("%s %s %d %.0fms", scope.get("method"), scope.get("path"), status[0],
                     1000 * (time.perf_counter() - t0))


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
