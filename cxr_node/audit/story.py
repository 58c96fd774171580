"""A study's audit trail told as sentences, for a reader (the web console's study page) and for
``cxr-node audit study UID``: no JSON, probabilities in percent, each priority said once.

Built on :func:`cxr_node.audit.describe`; the events a reader meets most get a sentence of their
own here, and any event without one is told by its reason or by what the event type means.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_LONG_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def short_uid(uid: str, keep: int = 8) -> str:
    """'1.2.826.0.1.3680043.8.498.1234567890' -> '...34567890' (long UIDs only)."""
    return uid if len(uid) <= keep + 12 else f"\u2026{uid[-keep:]}"


def _pct(p: Any) -> str:  # noqa: ANN401
    try:
        return f"{100 * float(p):.0f}%"
    except (TypeError, ValueError):
        return "?"


def _triaged(r: dict[str, Any]) -> str:
    d = r.get("detail") or {}
    probs = d.get("probabilities") or {}
    top = d.get("top_label") or "?"
    text = f"film {r['sop_instance_uid']} analysed: {top} {_pct(probs.get(top))}, priority {d.get('priority', '?')}"
    if r.get("reason"):
        text += f" ({r['reason'].replace('>=', 'at or above')})"
    return text + (f"; model {d['model_version']}" if d.get("model_version") else "")


def _processed(r: dict[str, Any]) -> str:
    d = r.get("detail") or {}
    parts = [f"version {d.get('version', '?')} processed: {d.get('analysed', 0)} film(s) analysed, "
             f"{d.get('refused', 0)} not analysed"]
    parts.append(f"priority {d['priority']}" if d.get("priority") else "no priority (nothing analysed)")
    parts.append(f"{d.get('objects', 0)} result object(s), {d.get('queued', 0)} queued to send")
    text = "; ".join(parts)
    return text + (f". {r['reason']}" if r.get("reason") else "")


_SENTENCES: dict[str, Callable[[dict[str, Any]], str]] = {
    "image.triaged": _triaged,
    "study.processed": _processed,
    "study.receiving": lambda r: "the first film of the study arrived",
    "study.complete": lambda r: "no more films arrived: the study is complete",
    "study.queued": lambda r: "queued for analysis",
    "study.processing": lambda r: "analysis started",
    "association.accepted": lambda r: f"connection from {r.get('calling_aet') or '?'} accepted",
    "association.released": lambda r: f"{r.get('calling_aet') or 'the sender'} closed the connection",
    "outbox.queued": lambda r: f"result {r['sop_instance_uid']} queued for {(r.get('detail') or {}).get('destination', '?')}",
}


def sentence(row: dict[str, Any], short: bool = False) -> str:
    """One audit row (as from :func:`cxr_node.audit.as_dict`) as a sentence; ``short`` shortens
    long UIDs to their last characters (the page shows the full ones elsewhere)."""
    from cxr_node.audit import trail as audit

    try:
        tell = _SENTENCES.get(row["event"])
        text = tell(row) if tell else (audit.describe(row) if row["event"] in audit._STORY else "")
    except (KeyError, TypeError, ValueError, AttributeError):  # an older row without the fields we expect
        text = ""
    if not text:
        text = row.get("reason") or audit.EVENTS.get(row["event"], row["event"])
    text = text.replace(" URGENT (", " (")  # the priority is said once
    if short:
        text = _LONG_UID.sub(lambda m: short_uid(m.group(0)), text)
    return text
