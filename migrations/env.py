"""Alembic environment for cxr-node. The URL comes from cxr-node's config (passed in by
``cxr_node.db.migrate``), never from an alembic.ini. SQLite uses batch mode so that
ALTERs (and real downgrades) work."""

from alembic import context

from cxr_node.db.models import Base
from cxr_node.db.engine import make_engine

config = context.config
url = config.attributes.get("url")
if not url:
    raise RuntimeError("run migrations through `cxr-node db upgrade`, which supplies the database URL")

engine = make_engine(url)
try:
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
finally:
    engine.dispose()
