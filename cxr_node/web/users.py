"""Web console accounts, kept in the database: a name, an argon2id password hash and a role.

Roles:

    admin        everything: every page, outbox retry and purge, feedback
    radiologist  the worklist and studies (with each study's own audit story), feedback on them
                 (once site onboarding is on), the model and status pages; not the whole audit
                 trail or the outbox
    viewer       read only: every page, no action

Accounts are managed from the command line (``cxr-node user add|passwd|disable|list``), by whoever
can read the node's config and database; every change is audited (``user.*``).
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cxr_node.audit import trail as audit
from cxr_node.db.models import WebSession, WebUser, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import ConfigError, CxrNodeError

ADMIN, RADIOLOGIST, VIEWER = "admin", "radiologist", "viewer"
ROLES = (ADMIN, RADIOLOGIST, VIEWER)
#: What each role may do; every route names the permission it needs.
#:   view        worklist, studies and their images, /api/studies, model, status, stations
#:   operations  the audit trail (page and exports) and the outbox list
#:   outbox      outbox retry and purge
#:   feedback    the reader's labels (site onboarding)
PERMISSIONS = {
    ADMIN: {"view", "operations", "outbox", "feedback"},
    RADIOLOGIST: {"view", "feedback"},
    VIEWER: {"view", "operations"},
}
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _hasher():  # noqa: ANN202 - argon2.PasswordHasher
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return _hasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


#: A hash to verify against when the user does not exist, so an unknown name costs the same time.
_DUMMY_HASH: list[str] = []


def dummy_verify(password: str) -> None:
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(hash_password("not a password of anyone"))
    verify_password(_DUMMY_HASH[0], password)


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ConfigError(f"user name {name!r}: use 1 to 64 letters, digits, '.', '_', '@' or '-', "
                          "starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"password too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ConfigError(f"password too long: at most {MAX_PASSWORD} characters")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    return role


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, set())


def _by(session: Session, name: str) -> WebUser | None:
    return session.scalar(select(WebUser).where(WebUser.name == name))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def add(db: Database, name: str, role: str, password: str) -> None:
    check_name(name)
    check_role(role)
    check_password(password)
    now = utcnow()
    with db.transaction() as s:
        if _by(s, name) is not None:
            raise CxrNodeError(f"user {name!r} exists already (`cxr-node user passwd {name}` sets a new password)")
        s.add(WebUser(name=name, password_hash=hash_password(password), role=role, disabled=False,
                      created_at=now, password_changed_at=now))
        audit.record(s, "user.added", detail={"user": name, "role": role, "by": _os_user()})


def set_password(db: Database, name: str, password: str) -> None:
    """A new password; the user's sessions end (log in again). A disabled user stays disabled."""
    check_password(password)
    with db.transaction() as s:
        u = _by(s, name)
        if u is None:
            raise CxrNodeError(f"no user {name!r} (`cxr-node user list` shows them)")
        u.password_hash, u.password_changed_at = hash_password(password), utcnow()
        s.execute(delete(WebSession).where(WebSession.user_id == u.id))
        audit.record(s, "user.password_changed", detail={"user": name, "by": _os_user()})


def disable(db: Database, name: str) -> None:
    """The user can no longer log in; their open sessions end at once."""
    with db.transaction() as s:
        u = _by(s, name)
        if u is None:
            raise CxrNodeError(f"no user {name!r} (`cxr-node user list` shows them)")
        u.disabled = True
        ended = s.execute(delete(WebSession).where(WebSession.user_id == u.id)).rowcount
        audit.record(s, "user.disabled", detail={"user": name, "by": _os_user(), "sessions_ended": ended})


def listing(db: Database) -> list[dict]:
    with db.session() as s:
        return [{"name": u.name, "role": u.role, "disabled": u.disabled,
                 "created_at": u.created_at.isoformat(timespec="seconds"),
                 "last_login_at": u.last_login_at.isoformat(timespec="seconds") if u.last_login_at else None}
                for u in s.scalars(select(WebUser).order_by(WebUser.name))]
