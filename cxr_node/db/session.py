"""The session factory for any SQLAlchemy URL (the engine's settings: :mod:`cxr_node.db.engine`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cxr_node.db.engine import make_engine
from cxr_node.errors import DatabaseError, SchemaError


class Database:
    """Owns one engine and hands out sessions; create one per process, pass it explicitly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    def session(self) -> Session:
        return self._sessions()

    def require_current_schema(self) -> None:
        """Fail with what to do when the database is not migrated to the newest revision."""
        from cxr_node.db import migrate

        try:
            have = migrate.current(self.url, engine=self.engine)
        except OperationalError as e:
            raise DatabaseError(f"cannot open the database {self.redacted_url}: {e.orig}")
        want = migrate.head()
        if have != want:
            raise SchemaError(
                f"database {self.redacted_url} is at revision {have or 'base (empty)'}, "
                f"not {want}: run `cxr-node db upgrade` first"
            )

    def restrict_permissions(self) -> None:
        """SQLite: make the database file and its WAL/SHM owner-only (they hold patient IDs)."""
        u = make_url(self.url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
            for suffix in ("", "-wal", "-shm"):
                p = Path(u.database + suffix)
                if p.exists():
                    p.chmod(0o600)

    @property
    def redacted_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()
