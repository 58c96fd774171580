"""Processing complete studies: the stages in order, readable top to bottom in ``run_studies``.

    claim queued studies -> choose frontal chest films (why not, per image) -> preprocess ->
    predict + Grad-CAM in batches -> Secondary Capture per film, SR per study ->
    outbox (durable) -> study processed, with its priority; all of it audited with the model version.

Runs in a scheduler worker thread, never in a receiving thread. The model is loaded once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import select

from cxr_node import assembly, audit
from cxr_node.config import Settings
from cxr_node.db.models import ImageResult, Instance, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.errors import CheckpointError, PreprocessError
from cxr_node.outbox import Outbox

log = logging.getLogger(__name__)

PROCESSING, PROCESSED, FAILED = "processing", "processed", "failed"
PRIORITY_ORDER = ("urgent", "review", "routine")


@dataclass
class Film:
    instance: Instance
    ds: Dataset
    x: object = None        # preprocessed tensor
    display: object = None  # film for the overlay
    prediction: object = None


@dataclass
class StudyWork:
    study_uid: str
    version: int
    films: list[Film] = field(default_factory=list)
    skipped: list[tuple[Instance, str]] = field(default_factory=list)


class Processor:
    def __init__(self, settings: Settings, db: Database, outbox: Outbox, node_id: str = "local",
                 metrics=None) -> None:  # noqa: ANN001
        self.metrics = metrics
        self.node_id = node_id  # recorded on claimed studies; nodes sharing a database requeue only their own
        self.settings = settings
        self.db = db
        self.outbox = outbox
        self._predictor = None
        self._identity = None

    # ------------------------------------------------------------------ model, loaded once

    def predictor(self):
        if self._predictor is None:
            from cxr_node.encode.identity import ModelIdentity
            from cxr_node.infer import Predictor

            ckpt = self.settings.model.checkpoint
            if not Path(ckpt).is_file():
                raise CheckpointError(f"model checkpoint {ckpt} not found: set [model] checkpoint or train one "
                                      "(see training/README.md)")
            self._predictor = Predictor(ckpt, device=self.settings.model.device)
            self._identity = ModelIdentity.from_meta(self._predictor.meta)
            log.info("model %s (%s) loaded from %s", self._identity.version, self._identity.arch, ckpt)
        return self._predictor

    def preload(self) -> None:
        """Load the model now (``serve`` calls this in a background thread at start-up, so the first
        study does not wait for it); :meth:`predictor` stays the lazy path if this fails."""
        self.predictor()

    # ------------------------------------------------------------------ the pipeline

    def requeue_interrupted(self) -> int:
        """At start-up: studies a crash left in ``processing`` go back to ``queued``."""
        n = 0
        with self.db.transaction() as s:
            for st in s.scalars(select(Study).where(Study.state == PROCESSING, Study.claimed_by == self.node_id)
                                .with_for_update()):
                st.state, st.state_changed_at = assembly.QUEUED, utcnow()
                audit.record(s, "study.queued", study_uid=st.study_uid, patient_id=st.patient_id,
                             reason="processing was interrupted; queued again at start-up",
                             detail={"from": PROCESSING, "to": assembly.QUEUED, "version": st.version})
                n += 1
        return n

    def process_queued(self, limit: int = 8) -> int:
        claimed = self.claim(limit)
        if claimed:
            self.run_studies(claimed)
        return len(claimed)

    def claim(self, limit: int) -> list[tuple[str, int]]:
        """Atomically move up to ``limit`` queued studies to processing."""
        out = []
        with self.db.transaction() as s:
            q = select(Study).where(Study.state == assembly.QUEUED).order_by(Study.state_changed_at).limit(limit)
            if self.db.engine.dialect.name != "sqlite":
                q = q.with_for_update(skip_locked=True)
            for st in s.scalars(q):
                st.state, st.state_changed_at, st.claimed_by = PROCESSING, utcnow(), self.node_id
                audit.record(s, "study.processing", study_uid=st.study_uid, patient_id=st.patient_id,
                             detail={"from": assembly.QUEUED, "to": PROCESSING, "version": st.version,
                                     "node": self.node_id})
                out.append((st.study_uid, st.version))
        return out

    def run_studies(self, claimed: list[tuple[str, int]]) -> None:
        try:
            predictor = self.predictor()
        except CheckpointError as e:
            for uid, version in claimed:
                self._fail(uid, version, str(e))
            return
        work = [self.choose(uid, version) for uid, version in claimed]
        films = [f for w in work for f in w.films]
        self.predict(predictor, films)
        for w in work:
            try:
                self.finish(w)
            except Exception as e:  # one broken study must not stop the others; it is recorded
                log.exception("processing study %s failed", w.study_uid)
                self._fail(w.study_uid, w.version, f"{type(e).__name__}: {e}")

    def choose(self, study_uid: str, version: int) -> StudyWork:
        """Load the study's films and decide per image whether it is analysed, and why not."""
        work = StudyWork(study_uid, version)
        with self.db.session() as s:
            instances = list(s.scalars(select(Instance).where(Instance.study_uid == study_uid)
                                       .order_by(Instance.received_at)))
        predictor = self.predictor()
        for inst in instances:
            if not inst.triage_eligible:
                work.skipped.append((inst, inst.not_for_triage_reason or "not a triage SOP class"))
                continue
            try:
                ds = dcmread(self.settings.storage.spool_dir / inst.path)
            except Exception as e:  # the file was valid on receipt; anything now is an I/O or decode fault
                work.skipped.append((inst, f"cannot read the spooled file: {type(e).__name__}: {e}"))
                continue
            reason = assembly.frontal_chest_reason(ds)
            if reason:
                work.skipped.append((inst, reason))
                continue
            film = Film(inst, ds)
            try:
                film.x, film.display = predictor.preprocess_with_display(ds)
            except PreprocessError as e:
                work.skipped.append((inst, f"unusable pixels: {e}"))
                continue
            work.films.append(film)
        return work

    def predict(self, predictor, films: list[Film]) -> None:
        import time

        bs = self.settings.model.batch_size
        for i in range(0, len(films), bs):
            batch = films[i:i + bs]
            t0 = time.perf_counter()
            for film, pred in zip(batch, predictor.predict([f.x for f in batch], explain=True)):
                film.prediction = pred
            if self.metrics:
                per_image = (time.perf_counter() - t0) / len(batch)
                for _ in batch:
                    self.metrics.inference.observe(per_image)

    def finish(self, w: StudyWork) -> None:
        """Encode the results, put them in the outbox, and record everything in one transaction."""
        from cxr_node.encode.sc import build_sc
        from cxr_node.encode.sr import AnalysedFilm, build_sr

        model = self._identity
        analysed, written = [], []
        for n, film in enumerate(w.films, start=1):
            sc = build_sc(film.ds, film.display, film.prediction, model, instance_number=n)
            written.append(self.outbox.write(sc, "sc"))
            analysed.append(AnalysedFilm(film.ds, sc, film.prediction))
        sr = None
        if analysed:
            sr = build_sr(analysed, model, study_version=w.version, predecessor=self._predecessor(w))
            written.append(self.outbox.write(sr, "sr"))
        priority = min((f.prediction.priority for f in w.films), key=_rank, default=None)

        now = utcnow()
        with self.db.transaction() as s:
            for inst, reason in w.skipped:
                s.add(ImageResult(study_uid=w.study_uid, study_version=w.version, sop_instance_uid=inst.sop_instance_uid,
                                  analysed=False, reason=reason, created_at=now))
                audit.record(s, "image.skipped", study_uid=w.study_uid, sop_instance_uid=inst.sop_instance_uid,
                             sop_class_uid=inst.sop_class_uid, patient_id=inst.patient_id, reason=reason,
                             detail={"version": w.version})
            for film, a in zip(w.films, analysed):
                p = film.prediction
                probs = dict(zip(p.labels, map(float, p.probabilities)))
                s.add(ImageResult(study_uid=w.study_uid, study_version=w.version,
                                  sop_instance_uid=film.instance.sop_instance_uid, analysed=True,
                                  model_version=model.version, top_label=p.top_label, urgent=p.urgent,
                                  priority=p.priority, probabilities=probs, sc_sop_instance_uid=a.sc.SOPInstanceUID,
                                  created_at=now))
                audit.record(s, "image.triaged", study_uid=w.study_uid, sop_instance_uid=film.instance.sop_instance_uid,
                             sop_class_uid=film.instance.sop_class_uid, patient_id=film.instance.patient_id,
                             reason="; ".join(p.reasons) or None,
                             detail={"version": w.version, "model_version": model.version, "device_uid": model.device_uid,
                                     "top_label": p.top_label, "urgent": p.urgent, "priority": p.priority,
                                     "probabilities": probs, "sc_uid": a.sc.SOPInstanceUID})
            queued = self.outbox.enqueue(s, written, w.study_uid, w.version)
            st = s.get(Study, w.study_uid, with_for_update=True)
            detail = {"version": w.version, "analysed": len(w.films), "skipped": len(w.skipped),
                      "priority": priority, "objects": len(written), "queued": queued,
                      "model_version": model.version, "sr_uid": sr.SOPInstanceUID if sr else None}
            if sr is not None:
                st.last_sr_uid = sr.SOPInstanceUID
            if st.state == PROCESSING and st.version == w.version:
                st.state, st.state_changed_at = PROCESSED, now
                st.priority, st.processed_version, st.last_error = priority, w.version, None
                detail.update({"from": PROCESSING, "to": PROCESSED})
            audit.record(s, "study.processed", study_uid=w.study_uid, patient_id=st.patient_id,
                         reason=None if w.films else "no frontal chest film to analyse", detail=detail)
        log.info("study %s v%d: %d analysed, %d skipped, priority %s, %d object(s) queued", w.study_uid, w.version,
                 len(w.films), len(w.skipped), priority, queued)

    def _predecessor(self, w: StudyWork) -> Dataset | None:
        """The SR this version revises: read from the outbox copy when it is still there."""
        with self.db.session() as s:
            st = s.get(Study, w.study_uid)
            last = st.last_sr_uid if st else None
        if not last or last == self._identity.sr_uid(w.study_uid, w.version):
            return None
        path = self.outbox.dir / w.study_uid / f"{last}.dcm"
        if path.is_file():
            return dcmread(path, stop_before_pixels=True)
        ref = Dataset()
        ref.StudyInstanceUID, ref.SOPInstanceUID = w.study_uid, last
        ref.SeriesInstanceUID = self._identity.sr_series_uid(w.study_uid)
        ref.SOPClassUID = Comprehensive3DSRStorage
        return ref

    def _fail(self, study_uid: str, version: int, reason: str) -> None:
        with self.db.transaction() as s:
            st = s.get(Study, study_uid, with_for_update=True)
            if st is not None and st.state == PROCESSING and st.version == version:
                st.state, st.state_changed_at, st.last_error = FAILED, utcnow(), reason
            audit.record(s, "study.failed", "failure", study_uid=study_uid, reason=reason, detail={"version": version})
        log.error("study %s v%d failed: %s", study_uid, version, reason)


def _rank(priority: str) -> int:
    return PRIORITY_ORDER.index(priority) if priority in PRIORITY_ORDER else len(PRIORITY_ORDER)
