"""Alembic, driven from the cxr-node CLI with the URL from the config file."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from cxr_node.db.engine import make_engine
from cxr_node.errors import DatabaseError


def migrations_dir() -> Path:
    """``migrations/`` of a source checkout, else the copy installed under share/."""
    candidates = [
        Path(__file__).resolve().parents[2] / "migrations",
        Path(sys.prefix) / "share" / "cxr-node" / "migrations",
    ]
    for c in candidates:
        if (c / "env.py").is_file():
            return c
    raise DatabaseError(f"Alembic migrations not found (looked in {', '.join(map(str, candidates))})")


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["url"] = url
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(_config("")).get_current_head()


def current(url: str, engine: Engine | None = None) -> str | None:
    eng = engine or make_engine(url)
    try:
        with eng.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if engine is None:
            eng.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    import os

    old = os.umask(0o077)  # a new SQLite file is created owner-only
    try:
        command.upgrade(_config(url), revision)
    finally:
        os.umask(old)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(_config(url), revision)
