"""Console pages: log in and out, and the health check."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from cxr_node.web.auth import LOGIN_COOKIE, SESSION_COOKIE, LoginRefused, Session, new_token, same
from cxr_node.web.console import Console, client_host, guarded, safe_next

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- login


async def login_page(request: Request) -> Response:
    console: Console = request.app.state.console
    token = new_token()
    resp = console.page(request, "login.html", {"csrf": token, "next": safe_next(request.query_params.get("next")),
                                                "error": None, "user": None})
    _set_cookie(resp, console, request, LOGIN_COOKIE, token, max_age=3600)
    return resp


async def login_submit(request: Request) -> Response:
    console: Console = request.app.state.console
    form = await request.form(max_files=0, max_fields=10)
    if not same(form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE)):
        return console.page(request, "message.html", {
            "user": None, "csrf": None, "title": "Not allowed", "back_home": "/login", "back_home_text": "Back to login",
            "message": "Forbidden: the login form's security token is missing or wrong; reload the login page and "
                       "try again."}, status=403)
    name, password = str(form.get("username") or ""), str(form.get("password") or "")
    nxt = safe_next(str(form.get("next") or "/"))
    try:
        token, _ = await run_in_threadpool(console.sessions.login, name, password[:1024], client_host(request))
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
    console.sessions.end(sess.token_id, client_host(request), "logged out", sess.user.name)
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
