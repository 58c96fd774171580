"""Console pages: the worklist, a study, its images and its readers' labels."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from cxr_node.db.models import ImageResult, Instance, Study
from cxr_node.web import images, queries
from cxr_node.web.auth import Session
from cxr_node.web.console import Console, client_host, guarded

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- worklist


def _worklist(console: Console, request: Request, sess: Session) -> tuple[queries.WorklistFilter, dict] | Response:
    try:
        f = queries.WorklistFilter.from_query(request.query_params)
    except queries.BadFilter as e:
        return PlainTextResponse(f"Bad filter: {e}", status_code=400)
    with console.db.session() as s:
        data = queries.worklist(s, f, settings=console.settings)
        data["station_choices"] = queries.stations(s)
    if f.patient_id:
        console.searched(sess, client_host(request), f.patient_id, data["total"])
    return f, data


@guarded()
def worklist_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    got = _worklist(console, request, sess)
    if isinstance(got, Response):
        return got
    f, data = got
    ctx = {"user": sess.user, "csrf": sess.csrf, "f": f, "data": data, "states": queries.studies.STATES,
           "priorities": queries.PRIORITIES, "qs": lambda **kw: urlencode(f.params(**kw))}
    if request.query_params.get("refresh"):
        return console.page(request, "worklist_rows.html", ctx)
    return console.page(request, "worklist.html", ctx)


@guarded(api=True)
def api_studies(console: Console, request: Request, sess: Session, form: Any) -> Response:
    got = _worklist(console, request, sess)
    if isinstance(got, Response):
        return JSONResponse({"error": got.body.decode()}, status_code=got.status_code)
    f, data = got
    data.pop("station_choices", None)
    data["filter"] = f.params()
    return JSONResponse(data)


# ---------------------------------------------------------------------------------- study


@guarded()
def study_page(console: Console, request: Request, sess: Session, form: Any) -> Response:
    uid = request.path_params["study_uid"]
    if not queries.valid_uid(uid):
        return _not_found(console, request, sess, "not a study UID")
    with console.db.session() as s:
        data = queries.study(s, console.settings, uid)
        if data is not None:
            data["feedback"] = queries.study_feedback(s, uid)
    if data is None:
        return _not_found(console, request, sess, "no such study on this node")
    console.viewed(sess, client_host(request), uid, data["study"]["patient_id"], "page")
    return console.page(request, "study.html", {"user": sess.user, "csrf": sess.csrf,
                                                "done": request.query_params.get("done"), **data})


@guarded(permission="feedback")
def study_feedback(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """The reader's label for the study or one of its films (cxr_node.onboarding.feedback.add_label; audited as
    feedback.added with the user as reader, superseding the label in force)."""
    from cxr_node.onboarding.feedback import FeedbackError, add_label

    uid = request.path_params["study_uid"]
    if not queries.valid_uid(uid):
        return _not_found(console, request, sess, "not a study UID")
    sop = (form.get("sop_instance_uid") or "").strip() or None
    if sop is not None and not queries.valid_uid(sop):
        return PlainTextResponse("Bad request: not a film UID.", status_code=400)
    try:
        out = add_label(console.db, uid, str(form.get("label") or ""), reader=sess.user.name, sop_instance_uid=sop,
                        source="web")
    except FeedbackError as e:
        done = f"Not stored: {e}."
    else:
        what = f"film {sop}" if sop else "the study"
        done = (f"{out.duplicate_of.label} was already the label in force for {what}: nothing changed."
                if out.feedback is None else
                f"Stored {out.feedback.label} for {what}" + (f" (it supersedes {out.superseded.label})."
                                                              if out.superseded else "."))
    return RedirectResponse(f"/study/{uid}?" + urlencode({"done": done}) + "#feedback", status_code=303)


def _not_found(console: Console, request: Request, sess: Session, why: str) -> Response:
    return console.page(request, "message.html", {"user": sess.user, "csrf": sess.csrf, "title": "Not found",
                                                  "message": f"Not found: {why}."}, status=404)


@guarded()
def study_image(console: Console, request: Request, sess: Session, form: Any) -> Response:
    """The overlay (a Secondary Capture of this study) or the film (an instance of this study) as PNG."""
    study_uid, name = request.path_params["study_uid"], request.path_params["name"]
    sop_uid = name.removesuffix(".png")
    if not name.endswith(".png") or not (queries.valid_uid(study_uid) and queries.valid_uid(sop_uid)):
        return PlainTextResponse("Not found", status_code=404)
    full = request.query_params.get("size") == "full"  # the full-size view; anything else: the page's size
    key = (study_uid, sop_uid, full)
    png = console.images.get(key)
    with console.db.session() as s:
        patient_id = s.scalar(select(Study.patient_id).where(Study.study_uid == study_uid))
    if png is None:
        path = None
        with console.db.session() as s:
            sc = s.scalar(select(ImageResult.id).where(ImageResult.study_uid == study_uid,
                                                       ImageResult.sc_sop_instance_uid == sop_uid).limit(1))
            if sc is not None:
                path = queries.result_file(console.settings, study_uid, sop_uid)
            else:
                inst = s.scalar(select(Instance).where(Instance.study_uid == study_uid,
                                                       Instance.sop_instance_uid == sop_uid,
                                                       Instance.removed_at.is_(None)))
                if inst is not None:
                    path = images.inside(console.settings.storage.spool_dir, inst.path)
        if path is None:
            return PlainTextResponse("Not found", status_code=404)
        try:
            png = images.render(path, images.FULL_SIDE if full else images.MAX_SIDE)
        except (OSError, ValueError, AttributeError, NotImplementedError, RuntimeError) as e:
            log.warning("cannot render %s of study %s: %s", sop_uid, study_uid, type(e).__name__)
            return PlainTextResponse("This image cannot be shown.", status_code=422)
        console.images.put(key, png)
    console.viewed(sess, client_host(request), study_uid, patient_id, "image")
    return Response(png, media_type="image/png")  # no-store like the pages: the console's cache serves repeats
