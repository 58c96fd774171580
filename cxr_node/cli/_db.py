"""The one way a CLI command opens the database.

Only ``cxr-node db upgrade`` creates a database. Every other command opens an existing one and
fails with what to do when there is none, so a command run with the wrong (or no) ``--config``
never leaves an empty database file behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from cxr_node.errors import DatabaseError

if TYPE_CHECKING:
    from cxr_node.config import Settings
    from cxr_node.db.session import Database


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or another backend."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def require_existing(settings: "Settings") -> None:
    """Raise DatabaseError, saying what to do, when the configured SQLite file does not exist."""
    path = sqlite_file(settings.database.url)
    if path is not None and not path.is_file():
        where = f"the config file {settings.source}" if settings.source else \
            "the built-in defaults (no --config and no $CXR_NODE_CONFIG)"
        raise DatabaseError(f"no database at {path} (from {where}): pass --config with the node's config "
                            "file, or run `cxr-node db upgrade` to create the database")


@contextlib.contextmanager
def open_database(settings: "Settings", *, check_schema: bool = True) -> "Iterator[Database]":
    """An existing database, at the newest schema unless ``check_schema`` is false; disposed on exit.

    Files SQLite makes while it is open (its WAL and shared-memory files) are owner-only, as the
    daemon's are."""
    from cxr_node.db.session import Database

    require_existing(settings)
    old = os.umask(0o077)
    db = Database(settings.database.url)
    try:
        if check_schema:
            db.require_current_schema()
        yield db
    finally:
        db.dispose()
        os.umask(old)
