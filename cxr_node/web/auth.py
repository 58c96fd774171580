"""Logging in and staying logged in: server-side sessions, CSRF tokens, login throttling.

* A session is a random token in an HttpOnly, SameSite=Strict cookie (Secure when the console
  serves TLS); the database keeps only the token's SHA-256, the user, a CSRF token and when it
  was last used. It ends after ``[web] idle_minutes`` unused, ``session_hours`` after login, at
  logout, or when the user is disabled or gets a new password.
* Every form carries the session's CSRF token (the login form a token bound to a cookie); a POST
  without the right one is refused with 403 before anything else is looked at.
* Login throttling: after ``FREE_FAILURES`` wrong passwords in a row for a user name (or
  ``FREE_FAILURES_PER_HOST`` from one address) the next attempt must wait, 10 s and doubling up
  to 5 minutes; an attempt made sooner is refused (429, Retry-After) without checking the
  password. The counters live in the console's memory (one process).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import delete, select

from cxr_node.audit import trail as audit
from cxr_node.db.models import WebSession, WebUser, utcnow
from cxr_node.db.session import Database
from cxr_node.web.users import User, dummy_verify, verify_password

SESSION_COOKIE = "cxr_session"
LOGIN_COOKIE = "cxr_login"
FREE_FAILURES = 5
FREE_FAILURES_PER_HOST = 20
FIRST_WAIT_SECONDS = 10.0
MAX_WAIT_SECONDS = 300.0
#: last_seen_at is written at most this often per session (a page refresh is not a database write).
TOUCH_SECONDS = 30.0


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens; a missing one never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def new_token() -> str:
    return secrets.token_urlsafe(32)


class LoginThrottle:
    """Consecutive failures per user name and per address; how long the next attempt must wait."""

    def __init__(self, clock=time.monotonic) -> None:  # noqa: ANN001
        self._clock = clock
        self._lock = threading.Lock()
        self._fails: dict[str, tuple[int, float]] = {}  # key -> (failures in a row, time of the last)

    @staticmethod
    def _wait(failures: int, free: int) -> float:
        if failures < free:
            return 0.0
        return min(MAX_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2 ** (failures - free))

    def retry_after(self, name: str, host: str) -> float:
        """Seconds until an attempt for ``name`` from ``host`` is allowed (0: now)."""
        now = self._clock()
        with self._lock:
            out = 0.0
            for key, free in ((f"user:{name.lower()}", FREE_FAILURES), (f"host:{host}", FREE_FAILURES_PER_HOST)):
                n, last = self._fails.get(key, (0, 0.0))
                out = max(out, last + self._wait(n, free) - now)
            return max(0.0, out)

    def failed(self, name: str, host: str) -> None:
        now = self._clock()
        with self._lock:
            for key in (f"user:{name.lower()}", f"host:{host}"):
                n, _ = self._fails.get(key, (0, 0.0))
                self._fails[key] = (n + 1, now)
            if len(self._fails) > 100_000:  # an address spraying names: forget the oldest
                for k, _ in sorted(self._fails.items(), key=lambda kv: kv[1][1])[:50_000]:
                    del self._fails[k]

    def succeeded(self, name: str, host: str) -> None:
        with self._lock:
            self._fails.pop(f"user:{name.lower()}", None)
            self._fails.pop(f"host:{host}", None)


class LoginRefused(Exception):
    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    token_id: str


class Sessions:
    def __init__(self, db: Database, idle_minutes: float, session_hours: float) -> None:
        self.db = db
        self.idle = dt.timedelta(minutes=idle_minutes)
        self.lifetime = dt.timedelta(hours=session_hours)
        self.throttle = LoginThrottle()

    def login(self, name: str, password: str, host: str) -> tuple[str, Session]:
        """A new session for a right password; LoginRefused (audited) otherwise."""
        name = (name or "").strip()[:64]
        wait = self.throttle.retry_after(name, host)
        if wait > 0:
            self._refused(name, host, f"throttled: too many failed logins, next attempt in {wait:.0f}s")
            raise LoginRefused("Too many failed logins: wait before trying again.", wait)
        with self.db.session() as s:
            u = s.scalar(select(WebUser).where(WebUser.name == name)) if name else None
        if u is None:
            dummy_verify(password)  # the same work as for a real user: no timing oracle for names
            ok, why = False, "unknown user"
        else:
            ok = verify_password(u.password_hash, password)
            why = "wrong password" if not ok else ("user disabled" if u.disabled else "")
            ok = ok and not u.disabled
        if not ok:
            self.throttle.failed(name, host)
            self._refused(name, host, why)
            raise LoginRefused("Wrong user name or password.")  # the same words whatever the reason
        self.throttle.succeeded(name, host)
        token, csrf, now = new_token(), new_token(), utcnow()
        with self.db.transaction() as s:
            # sessions nobody came back to would otherwise stay: end the expired ones here
            stale = s.execute(select(WebSession.id, WebUser.name).join(WebUser, WebUser.id == WebSession.user_id,
                                                                       isouter=True)
                              .where((WebSession.last_seen_at < now - self.idle)
                                     | (WebSession.created_at < now - self.lifetime)).limit(1000)).all()
            for sid, who in stale:
                s.execute(delete(WebSession).where(WebSession.id == sid))
                audit.record(s, "web.logout", reason="expired (ended at a later login)", detail={"user": who})
            s.add(WebSession(id=token_id(token), user_id=u.id, csrf=csrf, host=host[:64], created_at=now,
                             last_seen_at=now))
            s.get(WebUser, u.id).last_login_at = now
            audit.record(s, "web.login", host=host[:64], detail={"user": u.name, "role": u.role})
        return token, Session(User(u.id, u.name, u.role), csrf, token_id(token))

    def _refused(self, name: str, host: str, why: str) -> None:
        with self.db.transaction() as s:
            audit.record(s, "web.login_failed", "failure", host=host[:64], reason=why,
                         detail={"user": name})

    def resolve(self, token: str | None, host: str, touch: bool = True) -> Session | None:
        """The live session of a cookie token, or None (expired ones are ended and audited).
        ``touch=False`` (the worklist's own refresh) does not count as use: an open page left
        alone still times out."""
        if not token or len(token) > 128:
            return None
        tid = token_id(token)
        now = utcnow()
        with self.db.session() as s:
            row = s.get(WebSession, tid)
            u = s.get(WebUser, row.user_id) if row is not None else None
        if row is None:
            return None
        expired = None
        if u is None or u.disabled:
            expired = "user disabled"
        elif now - row.last_seen_at > self.idle:
            expired = "idle timeout"
        elif now - row.created_at > self.lifetime:
            expired = "session lifetime over"
        if expired:
            self.end(tid, host, expired, u.name if u else None)
            return None
        if touch and (now - row.last_seen_at).total_seconds() > TOUCH_SECONDS:
            with self.db.transaction() as s:
                r = s.get(WebSession, tid)
                if r is not None:
                    r.last_seen_at = now
        return Session(User(u.id, u.name, u.role), row.csrf, tid)

    def end(self, tid: str, host: str, reason: str, user: str | None) -> None:
        with self.db.transaction() as s:
            n = s.execute(delete(WebSession).where(WebSession.id == tid)).rowcount
            if n:
                audit.record(s, "web.logout", host=host[:64], reason=reason, detail={"user": user})
