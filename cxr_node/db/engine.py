"""The SQLAlchemy engine for any URL, with the settings durability needs.

SQLite gets WAL, ``synchronous=FULL`` (a committed row survives power loss, which is what
"durable before success" needs), a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction
so concurrent association threads queue for the write lock instead of failing with
SQLITE_BUSY_SNAPSHOT. Used by the session factory and by migrations alike.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url


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
