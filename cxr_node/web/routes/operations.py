"""Console pages: the audit trail and the outbox."""

from __future__ import annotations

import csv
import io
import json
import logging
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from cxr_node.audit import trail as audit
from cxr_node.db.models import utcnow
from cxr_node.errors import ConfigError
from cxr_node.web import queries
from cxr_node.web.auth import Session
from cxr_node.web.console import AUDIT_PAGE, EXPORT_LIMIT, Console, client_host, guarded

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- audit


def _audit_query(request: Request) -> tuple[audit.AuditQuery, dict[str, Any]]:
    from cxr_node.cli.audit import parse_time

    q = request.query_params
    events = [e for e in q.getlist("event") if e]
    unknown = [e for e in events if e not in audit.EVENTS]
    if unknown:
        raise ConfigError(f"unknown event type {unknown[0]!r}")
    outcome = q.get("outcome") or None
    if outcome and outcome not in ("success", "failure", "warning"):
        raise ConfigError("outcome must be success, failure or warning")
    study = q.get("study") or None
    if study and not queries.valid_uid(study):
        raise ConfigError("study: not a UID")
    try:
        page = queries.page_number(q.get("page"))
    except queries.BadFilter as e:
        raise ConfigError(str(e)) from e
    filters = {"since": q.get("since") or None, "until": q.get("until") or None, "study": study,
               "event": events, "calling_aet": (q.get("calling_aet") or None), "patient_id": q.get("patient_id") or None,
               "outcome": outcome}
    aq = audit.AuditQuery(
        since=parse_time(filters["since"], "since") if filters["since"] else None,
        until=parse_time(filters["until"], "until") if filters["until"] else None,
        study_uid=study, events=tuple(events), calling_aet=filters["calling_aet"],
        patient_id=filters["patient_id"], outcome=outcome, newest_first=True,
        limit=AUDIT_PAGE, offset=(page - 1) * AUDIT_PAGE)
    return aq, {**filters, "page": page}


@guarded(permission="operations")
def audit_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    try:
        aq, filters = _audit_query(request)
    except ConfigError as e:
        return PlainTextResponse(f"Bad filter: {e}", status_code=400)
    fmt = request.query_params.get("format") or "html"
    if fmt not in ("html", "csv", "json", "dicom-audit"):
        return PlainTextResponse("Bad format: html, csv, json or dicom-audit", status_code=400)
    shown = {k: v for k, v in filters.items() if v and k != "page"}
    if fmt != "html":
        from dataclasses import replace

        with console.db.session() as s:
            rows = audit.as_dicts(audit.query(s, replace(aq, newest_first=False, limit=EXPORT_LIMIT, offset=0)))
        console.record("web.audit_viewed", sess, client_host(request), study_uid=aq.study_uid, patient_id=aq.patient_id,
                       detail={"format": fmt, "filters": shown, "rows": len(rows)})
        return _export(rows, fmt, console.settings.node.ae_title)
    with console.db.session() as s:
        rows = audit.as_dicts(audit.query(s, aq))
        total = audit.count(s, aq)
    chain = console.chain_state(force=bool(request.query_params.get("verify")))
    console.record("web.audit_viewed", sess, client_host(request), study_uid=aq.study_uid, patient_id=aq.patient_id,
                   detail={"format": "html", "filters": shown, "page": filters["page"]})
    params = [(k, v) for k, v in filters.items() if v and k not in ("page", "event")] + \
        [("event", e) for e in filters["event"]]
    return console.page(request, "audit.html", {
        "user": sess.user, "csrf": sess.csrf, "rows": rows, "total": total, "filters": filters,
        "events": sorted(audit.EVENTS), "chain": chain, "page": filters["page"],
        "pages": max(1, -(-total // AUDIT_PAGE)), "qs": lambda **kw: urlencode(params + list(kw.items()))})


def _export(rows: list[dict[str, Any]], fmt: str, node_aet: str) -> Response:
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    buf = io.StringIO()
    if fmt == "json":
        json.dump(rows, buf, indent=1)
        media, ext = "application/json", "json"
    elif fmt == "csv":
        w = csv.DictWriter(buf, fieldnames=list(audit.FIELDS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else v) for k, v in r.items()})
        media, ext = "text/csv", "csv"
    else:
        from cxr_node.audit.atna import write_messages

        write_messages(rows, node_aet, buf)
        media, ext = "application/xml", "xml"
    return Response(buf.getvalue(), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="cxr-node-audit-{stamp}.{ext}"'})


# ---------------------------------------------------------------------------------- outbox


@guarded(permission="operations")
def outbox_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    state = request.query_params.get("state") or None
    if state and state not in ("pending", "sent", "dead"):
        return PlainTextResponse("Bad filter: state must be pending, sent or dead", status_code=400)
    try:
        page = queries.page_number(request.query_params.get("page"))
    except queries.BadFilter as e:
        return PlainTextResponse(f"Bad filter: {e}", status_code=400)
    with console.db.session() as s:
        data = queries.outbox(s, state, page)
        data["notifications"] = _notifications(s, state)
    return console.page(request, "outbox.html", {"user": sess.user, "csrf": sess.csrf, "state": state, **data,
                                                 "message": request.query_params.get("done")})


def _notifications(s, state: str | None, limit: int = 50) -> dict[str, Any]:
    """The newest urgent notifications (HL7 v2, FHIR) and the counts by state."""
    from sqlalchemy import func, select

    from cxr_node.db.models import Notification

    q = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if state:
        q = q.where(Notification.state == state)
    rows = [{"id": n.id, "state": n.state, "channel": n.channel, "kind": n.kind, "study_uid": n.study_uid,
             "study_version": n.study_version, "call": n.call, "priority": n.priority, "correction": n.correction,
             "attempts": n.attempts, "created_at": queries._iso(n.created_at), "sent_at": queries._iso(n.sent_at),
             "next_attempt_at": queries._iso(n.next_attempt_at), "last_error": n.last_error} for n in s.scalars(q)]
    counts = dict(s.execute(select(Notification.state, func.count()).group_by(Notification.state)).all())
    return {"items": rows, "counts": counts}


def _ids(form: Any, name: str = "id") -> list[int]:
    out = []
    for v in form.getlist(name):
        if v.isascii() and v.isdigit() and len(v) <= 18:  # a row id; larger ones overflow the database's integer
            out.append(int(v))
    return out[:10_000]


@guarded(permission="outbox")
def outbox_retry(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """Dead items (all, or the ones ticked) back to pending; a confirmation page first."""
    from cxr_node.outbox.queue import Outbox

    ids, nids, all_dead = _ids(form), _ids(form, "nid"), form.get("all_dead") == "1"
    if not ids and not nids and not all_dead:
        return RedirectResponse("/outbox?" + urlencode({"done": "Nothing selected to retry."}), status_code=303)
    if form.get("confirm") != "yes":
        what = ("every dead item and notification" if all_dead else
                f"{len(ids)} item(s)" + (f" and {len(nids)} notification(s)" if nids else ""))
        return console.page(request, "confirm.html", {
            "user": sess.user, "csrf": sess.csrf, "action": "/outbox/retry", "title": "Retry sending",
            "question": f"Put {what} back to pending, to be sent again now?",
            "fields": [("id", str(i)) for i in ids] + [("nid", str(i)) for i in nids]
            + ([("all_dead", "1")] if all_dead else [])})
    box = Outbox(console.settings, console.db)
    n = box.retry(ids, all_dead=all_dead, by=sess.user.name) if ids or all_dead else 0
    m = box.notifier.retry(nids, all_dead=all_dead, by=sess.user.name) if nids or all_dead else 0
    return RedirectResponse("/outbox?" + urlencode({"done": f"{n} item(s) and {m} notification(s) pending again."}),
                            status_code=303)


@guarded(permission="outbox")
def outbox_purge(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """Sent and/or dead items (rows and files) removed; a confirmation page first."""
    from cxr_node.outbox.queue import Outbox

    states = [s for s in ("sent", "dead") if form.get(s) == "1"]
    if not states:
        return RedirectResponse("/outbox?" + urlencode({"done": "Say what to purge: sent and/or dead."}),
                                status_code=303)
    older = form.get("older_than") or ""
    try:
        days = float(older) if older else None
    except ValueError:
        return PlainTextResponse("older_than must be a number of days", status_code=400)
    if days is not None and not 0 <= days <= 36500:
        return PlainTextResponse("older_than must be from 0 to 36500 days", status_code=400)
    if form.get("confirm") != "yes":
        return console.page(request, "confirm.html", {
            "user": sess.user, "csrf": sess.csrf, "action": "/outbox/purge", "title": "Purge the outbox",
            "question": f"Delete every {' and '.join(states)} item{' older than %g days' % days if days else ''}, "
                        "rows and result files? This cannot be undone.",
            "fields": [(s, "1") for s in states] + ([("older_than", older)] if older else [])})
    n = Outbox(console.settings, console.db).purge(states, days, by=sess.user.name)
    return RedirectResponse("/outbox?" + urlencode({"done": f"{n} item(s) purged."}), status_code=303)
