"""The web console (``cxr-node web``): a process of its own that reads the daemon's database and
files and never writes the spool.

    users.py     local accounts: argon2 password hashes, roles, add/passwd/disable
    auth.py      sessions (server-side, idle timeout), CSRF tokens, login throttling
    queries.py   what the pages show: the worklist, a study, the outbox, the model
    images.py    film and overlay PNGs rendered from the spool and outbox (downscaled, cached)
    app.py       the Starlette application: routes, roles, audit of every view
"""
