"""UID checks shared by everything that turns a UID from a peer or a URL into a path or a query."""

from __future__ import annotations

import re

# A UID is digits and dots, at most 64 characters (PS3.5 9.1). Checked before a UID becomes a
# path component, so a hostile dataset or URL cannot reach outside the spool or the outbox.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid) <= 64 and bool(_UID_RE.match(uid))


#: Our Implementation Class UID (PS3.7 D.3.3.2), sent in every A-ASSOCIATE-RQ and -AC: a UUID-derived
#: UID (PS3.5 B.2), ``derived_uid("cxr-node", "implementation-class")`` in :mod:`cxr_node.encode.identity`,
#: fixed here for good. It names the implementation; the version name says which release.
IMPLEMENTATION_CLASS_UID = "2.25.51011294669646715154942611675099160939"


def implementation_version_name() -> str:
    """``CXRNODE_<version>``: at most 16 characters of the default repertoire (PS3.7 D.3.3.2)."""
    from cxr_node import __version__

    return f"CXRNODE_{__version__}"[:16]


def identify(ae):
    """Give a pynetdicom AE our Implementation Class UID and Version Name (not pynetdicom's); returns it."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = implementation_version_name()
    return ae
