"""UID checks shared by everything that turns a UID from a peer or a URL into a path or a query."""

from __future__ import annotations

import re

# A UID is digits and dots, at most 64 characters (PS3.5 9.1). Checked before a UID becomes a
# path component, so a hostile dataset or URL cannot reach outside the spool or the outbox.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid) <= 64 and bool(_UID_RE.match(uid))
