"""A station's versioned fits (site calibrations, site heads): one active version per station,
bound to the model weights they were fitted for; rolling back retires the active one and restores
the newest earlier version for the same weights."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from cxr_node.db.models import utcnow


def active(session, model: Any, station: str):
    """The station's active version of ``model`` (SiteCalibration or SiteHead), or None."""
    return session.scalars(select(model).where(model.station == station, model.active.is_(True))).first()


def retire_and_restore(session, model: Any, current):
    """Retire ``current`` and make the newest earlier version for the same weights active again;
    returns that version, or None (the station then runs on the model's own figures)."""
    current.active, current.retired_at = False, utcnow()
    prev = session.scalars(select(model).where(
        model.station == current.station, model.version < current.version,
        model.weights_sha256 == current.weights_sha256).order_by(model.version.desc())).first()
    if prev is not None:
        prev.active, prev.retired_at = True, None
    return prev
