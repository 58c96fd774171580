"""Engine and session factory for any SQLAlchemy URL.

SQLite gets WAL, ``synchronous=FULL`` (a committed row survives power loss, which is what
"durable before success" needs), a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction
so concurrent association threads queue for the write lock instead of failing with
SQLITE_BUSY_SNAPSHOT.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cxr_node.errors import DatabaseError, SchemaError


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # hide_parameters: a database error's message (logged) never carries row values such as patient IDs
        engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # pool_pre_ping: after a database restart the first statement gets a fresh connection, not an error
    return create_engine(u, pool_pre_ping=True, hide_parameters=True)


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
