"""The pipeline's last stage: what a processed study leaves behind, in one transaction (image
results, audit rows, outbox rows, the study's state)."""

from __future__ import annotations

import logging

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from cxr_node.audit import trail as audit
from cxr_node.config import Settings
from cxr_node.db.models import ImageResult, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.encode import wording
from cxr_node.encode.identity import ModelIdentity
from cxr_node.onboarding import stations
from cxr_node.outbox.files import result_path
from cxr_node.outbox.queue import Outbox
from cxr_node.study import leases
from cxr_node.study import states as studies
from cxr_node.study.work import StudyWork, element

log = logging.getLogger(__name__)

PRIORITY_ORDER = ("urgent", "review", "routine")


def rank(priority: str) -> int:
    return PRIORITY_ORDER.index(priority) if priority in PRIORITY_ORDER else len(PRIORITY_ORDER)


def record(settings: Settings, db: Database, outbox: Outbox, w: StudyWork, written: list, sr: Dataset | None,
           model: ModelIdentity, default_temperature: float, node_id: str | None = None) -> None:
    """Outbox rows (none for a station in shadow mode), image results, audit rows and the study's
    state change, in one transaction. With ``node_id``: nothing, if another node has taken the
    study over meanwhile (this node's lease lapsed: :func:`cxr_node.study.leases.still_holds`)."""
    ref = w.station or stations.resolve(settings, None)
    shadow = ref.mode == stations.SHADOW
    temperature = model.temperature if model.temperature is not None else default_temperature
    analysed = w.analysed
    priority = min((f.prediction.priority for f in analysed), key=rank, default=None)
    not_analysed = list(w.skipped) + [(f.instance, f.refused) for f in w.refused]
    now = utcnow()
    stats = {f.instance.sop_instance_uid: f.stats for f in w.films}
    with db.transaction() as s:
        st = s.get(Study, w.study_uid, with_for_update=True)  # first: the lock order of every study writer
        if node_id is not None and not leases.still_holds(st, w.version, node_id):
            log.warning("study %s v%d: taken over by %s while this node analysed it (its lease lapsed); this "
                        "node's results are dropped, the other node's count", w.study_uid, w.version,
                        st.claimed_by or "another node")
            return
        stations.note(s, ref)
        for inst, reason in not_analysed:
            film = next((f for f in w.refused if f.instance is inst), None)
            s.add(ImageResult(study_uid=w.study_uid, study_version=w.version, sop_instance_uid=inst.sop_instance_uid,
                              analysed=False, reason=reason.text, refusal_code=reason.code.value,
                              created_at=now, station=ref.name,
                              image_stats=stats.get(inst.sop_instance_uid),
                              ood_score=getattr(film.prediction, "ood_score", None) if film else None))
            audit.record(s, "image.skipped", "warning", study_uid=w.study_uid, sop_instance_uid=inst.sop_instance_uid,
                         sop_class_uid=inst.sop_class_uid, patient_id=inst.patient_id, reason=reason.text,
                         detail={"version": w.version, "refusal_code": reason.code.value,
                                 **({"character_set": film.charset} if film and film.charset else {})})
        sc_uids = iter(d.sop_instance_uid for d in written if d.kind == "sc")
        for film in analysed:
            p, sc_uid = film.prediction, next(sc_uids)
            probs = dict(zip(p.labels, map(float, p.probabilities)))
            finding, finding_p = wording.top_finding(p, model)
            s.add(ImageResult(study_uid=w.study_uid, study_version=w.version,
                              sop_instance_uid=film.instance.sop_instance_uid, analysed=True,
                              model_version=model.version, top_label=p.top_label, urgent=p.urgent,
                              priority=p.priority, probabilities=probs, sc_sop_instance_uid=sc_uid,
                              created_at=now, station=ref.name, calibration=model.calibration,
                              temperature=temperature, ood_score=p.ood_score, image_stats=film.stats,
                              abnormal=getattr(p, "abnormal", None), finding=finding[:64],
                              finding_probability=finding_p))
            audit.record(s, "image.triaged", study_uid=w.study_uid, sop_instance_uid=film.instance.sop_instance_uid,
                         sop_class_uid=film.instance.sop_class_uid, patient_id=film.instance.patient_id,
                         reason="; ".join(p.reasons) or None,
                         detail={"version": w.version, "model_version": model.version, "device_uid": model.device_uid,
                                 "top_label": p.top_label, "urgent": p.urgent, "priority": p.priority,
                                 "probabilities": probs, "abnormal": getattr(p, "abnormal", None),
                                 "sc_uid": sc_uid, "ood_score": p.ood_score,
                                 "station": ref.name, "calibration": model.calibration,
                                 "temperature": temperature,
                                 **({"character_set": film.charset} if film.charset else {})})
        queued = 0 if shadow else outbox.enqueue(s, written, w.study_uid, w.version)
        told = [] if shadow else outbox.notifier.decide(s, w, model)  # urgent, or a changed call
        detail = {"analysed": len(analysed), "refused": len(w.refused), "skipped": len(not_analysed),
                  "priority": priority, "objects": len(written), "queued": queued,
                  "sent_priority": w.sent_priority, "upstream": w.upstream.source if w.upstream else None,
                  "triggers": list(getattr(model, "triggers", ())), "notified": told,
                  "model_version": model.version, "sr_uid": sr.SOPInstanceUID if sr else None,
                  "station": ref.name, "mode": ref.mode, "calibration": model.calibration}
        if shadow and written:
            audit.record(s, "study.shadow", study_uid=w.study_uid, patient_id=st.patient_id,
                         calling_aet=ref.ae_title,
                         reason=f"station {ref.name} is in shadow mode: {len(written)} result object(s) kept, "
                                "none sent (`cxr-node resend` delivers them)",
                         detail={"version": w.version, "station": ref.name, "objects": len(written)})
        if sr is not None:
            st.last_sr_uid = sr.SOPInstanceUID
        accession = next((str(element(f.ds, "AccessionNumber") or "").strip() for f in w.films
                          if str(element(f.ds, "AccessionNumber") or "").strip()), None)
        if accession:
            st.accession_number = accession[:16]
        reason = None if analysed else ("no frontal chest film to analyse" if not w.films
                                        else "no film was analysed: " + "; ".join(f.refused.text for f in w.refused))
        if w.films and sr is None:
            reason += "; no SR sent: no chest film by its header ([eligibility] report_non_chest)"
        if studies.finish(s, st, w.version, reason=reason, **detail):
            st.priority, st.processed_version, st.last_error = priority, w.version, None
        else:
            audit.record(s, "study.processed", study_uid=w.study_uid, patient_id=st.patient_id,
                         reason=reason, detail={"version": w.version, **detail})
    log.info("study %s v%d: %d analysed, %d refused, %d skipped, priority %s, %d object(s) queued%s", w.study_uid,
             w.version, len(analysed), len(w.refused), len(w.skipped), priority, queued,
             f" (station {ref.name} in shadow mode: kept, not sent)" if shadow else "")


def predecessor(db: Database, outbox: Outbox, identity: ModelIdentity, w: StudyWork) -> Dataset | None:
    """The SR this version revises: read from the outbox copy when it is still there."""
    with db.session() as s:
        st = s.get(Study, w.study_uid)
        last = st.last_sr_uid if st else None
    if not last or last == identity.sr_uid(w.study_uid, w.version):
        return None
    path = outbox.dir / result_path(w.study_uid, last)
    if path.is_file():
        return dcmread(path, stop_before_pixels=True)
    ref = Dataset()
    ref.StudyInstanceUID, ref.SOPInstanceUID = w.study_uid, last
    ref.SeriesInstanceUID = identity.sr_series_uid(w.study_uid)
    ref.SOPClassUID = ComprehensiveSRStorage
    return ref
