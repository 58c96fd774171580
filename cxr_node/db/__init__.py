"""The audit database: SQLAlchemy models, engine factory and Alembic migrations.

No engine is created at import time; ``Database(url)`` makes one.
"""
