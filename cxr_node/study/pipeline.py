"""Processing complete studies: the stages in order, readable top to bottom in :meth:`Processor.run_studies`.

    load         claim queued studies, read each film's header from the spool
    eligibility  header rules (cxr_node.eligibility.rules): SOP class, body part, view
    preprocess   the one MONAI chain (cxr_node.model.preprocess.prepare): LUTs, CLAHE, lung fields,
                 lung crop when the model was trained with it, resize; films without two
                 plausible lung fields are refused here
    infer        probabilities, out-of-domain score, Grad-CAM (cxr_node.model.infer), in batches;
                 films outside the training distribution are refused here
    triage       operating points -> urgent flag and priority (cxr_node.model.policy.Finding); a study
                 from a station with a site calibration (cxr_node.onboarding.stations) uses that
                 station's temperature and operating points, and its results say so
    encode       a Secondary Capture per analysed film, one SR per study naming refused films; no
                 SR for a study none of whose films is a chest film by its header
    enqueue      the outbox (durable) for every destination, unless the study's station is in
                 shadow mode (results kept, nothing sent)
    record       image results, audit rows, and the study's state (cxr_node.study.states), in one transaction
    drift        each station's recent films against its reference (cxr_node.onboarding.stations.check_drift)

Runs in a scheduler worker thread, never in a receiving thread. The models are loaded once.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import select

from cxr_node.config import Settings
from cxr_node.db.models import Instance, Study
from cxr_node.db.session import Database
from cxr_node.eligibility import rules as eligibility
from cxr_node.eligibility.refusal import Refusal, RefusalCode
from cxr_node.errors import CheckpointError, PreprocessError
from cxr_node.logs import redact_quoted
from cxr_node.onboarding import stations
from cxr_node.outbox.files import result_path
from cxr_node.outbox.queue import Outbox
from cxr_node.study import results
from cxr_node.study import states as studies
from cxr_node.study.work import Film, StudyWork, as_int, element

log = logging.getLogger(__name__)

class Processor:
    def __init__(self, settings: Settings, db: Database, outbox: Outbox, node_id: str = "local",
                 metrics=None) -> None:
        self.metrics = metrics
        self.node_id = node_id  # recorded on claimed studies; nodes sharing a database requeue only their own
        self.settings = settings
        self.db = db
        self.outbox = outbox
        self._predictor = None
        self._segmenter = None
        self._identity = None
        # the start-up preload thread and the first worker may both ask for the models; importing
        # MONAI from two threads at once fails (a partially initialised module), so one loads
        self._load_lock = threading.Lock()

    # ------------------------------------------------------------------ models, loaded once

    def predictor(self):
        with self._load_lock:
            return self._load()

    def _load(self):
        if self._predictor is None:
            from cxr_node.encode.identity import ModelIdentity
            from cxr_node.model.infer import Predictor
            from cxr_node.model.lungs import LungSegmenter

            ckpt = self.settings.model.checkpoint
            if not Path(ckpt).is_file():
                raise CheckpointError(f"model checkpoint {ckpt} not found: set [model] checkpoint or train one "
                                      "(see training/README.md)")
            predictor = Predictor(ckpt, device=self.settings.model.device,
                                  ood_reference=self.settings.model.ood_reference)
            self._segmenter = LungSegmenter(self.settings.model.lung_checkpoint, device=predictor.device)
            self._identity = ModelIdentity.from_meta(predictor.meta)
            self._predictor = predictor
            log.info("model %s (%s) loaded from %s; lung segmenter %s; out-of-domain reference: %s",
                     self._identity.version, self._identity.arch, ckpt, self._segmenter.version,
                     "threshold %.1f" % predictor.ood.threshold if predictor.ood else "none")
        return self._predictor

    def preload(self) -> None:
        """Load the model now (``serve`` calls this in a background thread at start-up, so the first
        study does not wait for it); :meth:`predictor` stays the lazy path if this fails. Then warm
        it up: import the later stages' modules and run both networks (and Grad-CAM) once on a blank
        film, which took the first study about 5 s more than the next on 2 cores (bench/e2e.py), and
        draw one overlay with its legend (the first Secondary Capture's imports and font: about 0.8 s).
        A study arriving meanwhile waits for the warm-up (the load lock)."""
        with self._load_lock:
            predictor = self._load()
            t0 = time.perf_counter()
            import numpy as np
            import torch

            import cxr_node.encode.sc
            import cxr_node.encode.sr
            import cxr_node.model.calibration
            import cxr_node.model.policy
            import cxr_node.model.preprocess  # noqa: F401

            s = predictor.input_size
            blank = list(predictor.predict([torch.zeros(1, s, s)], explain=True))[0]
            self._segmenter.probability(np.zeros((s, s), dtype=np.float32))
            # the Secondary Capture's first picture: scipy.ndimage, the colour map, PIL's font, highdicom
            import highdicom  # noqa: F401

            from cxr_node.encode import overlay
            if blank.cam is not None:
                rgb = overlay.render_overlay(np.zeros((s, s), dtype=np.float32), blank.cam,
                                             lung_mask=np.ones((s, s), dtype=np.float32),
                                             top_fraction=overlay.TOP_FRACTION)
                overlay.with_legend(rgb, [("warm-up", (255, 255, 255))])
            log.info("model warmed up in %.1f s", time.perf_counter() - t0)

    # ------------------------------------------------------------------ the pipeline

    def requeue_interrupted(self) -> int:
        """At start-up: studies a crash left in ``processing`` go back to ``queued`` (failed once they
        have been interrupted ``[study] max_attempts`` times)."""
        return studies.requeue_interrupted(self.db, self.node_id, self.settings.study.max_attempts)

    def process_queued(self, limit: int = 8) -> int:
        claimed = studies.claim(self.db, limit, self.node_id)
        if claimed:
            self.run_studies(claimed)
        return len(claimed)

    def run_studies(self, claimed: list[tuple[str, int]]) -> None:
        """The stages over every claimed study (films are batched across studies). No study is left
        in ``processing``: a film that breaks a stage is refused with its reason, a study that breaks
        one is failed (and retried, bounded), and a fault no stage caught sends each study through
        alone so that one study cannot take the batch down with it."""
        try:
            predictor = self.predictor()
        except CheckpointError as e:
            for uid, version in claimed:
                self.fail(uid, version, str(e))
            return
        try:
            self._run(predictor, claimed)
        except Exception as e:  # not one film's or one study's fault as far as the stages could tell
            pending = studies.still_processing(self.db, claimed)
            log.error("a batch of %d stud(ies) failed (%s); %d still to finish are processed one by one",
                      len(claimed), type(e).__name__, len(pending))
            log.debug("batch failure", exc_info=True)
            if len(claimed) == 1:
                for uid, version in pending:
                    self.fail(uid, version, f"processing failed: {type(e).__name__}: {e}")
                return
            for one in pending:
                try:
                    self._run(predictor, [one])
                except Exception as e1:  # this study's own fault: failed, retried with backoff
                    log.debug("study failure", exc_info=True)
                    self.fail(*one, f"processing failed: {type(e1).__name__}: {e1}")

    def _run(self, predictor, claimed: list[tuple[str, int]]) -> None:
        work = [self.load(uid, version) for uid, version in claimed]      # load + header eligibility
        stations.ensure(self.db, [w.station for w in work])                 # new stations audited once
        films = [f for w in work for f in w.films]
        self.preprocess(predictor, films)                                 # pixels, lung fields, crop
        self.infer(predictor, films)                                      # probabilities, OOD, Grad-CAM
        work = self.triage(predictor, work)                               # operating points -> priority
        for w in work:
            try:
                written, sr = self.encode(w)                              # SC per film, SR per study
                self.record(w, written, sr)                               # outbox + results + audit + state
            except Exception as e:  # one broken study must not stop the others; it is recorded
                log.error("processing study %s failed: %s", w.study_uid, type(e).__name__)
                log.debug("study failure", exc_info=True)
                self.fail(w.study_uid, w.version, f"{type(e).__name__}: {e}")
        self.drift(predictor, {w.station.name for w in work if w.station is not None})

    def fail(self, study_uid: str, version: int, reason: str) -> None:
        """The study failed this attempt: recorded, and queued again after the backoff while the
        configured attempts last (``[study] max_attempts``, ``retry_seconds``). ``reason`` often
        carries an exception's text, and library messages quote the values they judge (a patient
        name among them): quoted parts are withheld before it reaches the audit trail and the log."""
        st = self.settings.study
        studies.fail(self.db, study_uid, version, redact_quoted(reason)[:2000], max_attempts=st.max_attempts,
                     retry_seconds=st.retry_seconds)

    def drift(self, predictor, names: set[str]) -> None:
        """Each station's recent films against its reference; a failure here never fails a study."""
        if not names:
            return
        try:
            stations.check_drift(self.settings, self.db, sorted(names), predictor.policy.labels,
                                 predictor.weights_sha256)
        except Exception:  # the studies are recorded; drift is checked again with the next ones
            log.exception("drift check for %s failed", ", ".join(sorted(names)))

    def load(self, study_uid: str, version: int) -> StudyWork:
        """Read the study's films and apply the header rules (why not, per image)."""
        work = StudyWork(study_uid, version)
        rules = eligibility.settings_rules(self.settings)
        with self.db.session() as s:
            instances = list(s.scalars(select(Instance).where(Instance.study_uid == study_uid)
                                       .order_by(Instance.received_at)))
        for inst in instances:
            if not inst.triage_eligible:
                work.skipped.append((inst, Refusal(RefusalCode.SOP_CLASS,
                                                   inst.not_for_triage_reason or "not a triage SOP class")))
                continue
            try:
                ds = dcmread(self.settings.storage.spool_dir / inst.path)
            except Exception as e:  # the file was valid on receipt; anything now is an I/O or decode fault
                work.skipped.append((inst, eligibility.unreadable(
                    f"cannot read the spooled file: {type(e).__name__}: {e}")))
                continue
            if work.station is None:
                work.station = stations.resolve(self.settings, inst.calling_aet, element(ds, "StationName"),
                                                element(ds, "InstitutionName"))
            work.films.append(Film(inst, ds, refused=eligibility.header_reason(ds, **rules),
                                   stats={"rows": as_int(element(ds, "Rows")), "cols": as_int(element(ds, "Columns"))}))
        if work.station is None:
            aet = instances[0].calling_aet if instances else None
            work.station = stations.resolve(self.settings, aet)
        return work

    def preprocess(self, predictor, films: list[Film]) -> None:
        import numpy as np

        from cxr_node.model.preprocess import prepare

        check = self.settings.eligibility.check_pixels
        for film in films:
            if film.refused:
                continue
            try:
                pr = prepare(film.ds, predictor.params, self._segmenter)
            except PreprocessError as e:
                film.refused = eligibility.preprocess_refusal(e)
                continue
            except Exception as e:  # a fault the preprocessing rules did not name: this film only
                log.warning("film %s: preprocessing failed (%s); refused", film.instance.sop_instance_uid,
                            type(e).__name__)
                log.debug("preprocessing failure", exc_info=True)
                film.refused = eligibility.unusable_pixels(f"preprocessing failed ({type(e).__name__})")
                continue
            film.x, film.display, film.lungs, film.box, film.full = pr.x, pr.display, pr.lungs, pr.box, pr.film
            d = np.asarray(pr.display, dtype=np.float64)  # the film in [0, 1], for drift
            film.stats.update(mean=round(float(d.mean()), 5), std=round(float(d.std()), 5))
            if check:
                film.refused = eligibility.lung_reason(pr.lungs)

    def infer(self, predictor, films: list[Film]) -> None:
        ready = [f for f in films if f.refused is None]
        bs = self.settings.model.batch_size
        threshold = predictor.ood.threshold if predictor.ood and self.settings.eligibility.check_pixels else None
        for i in range(0, len(ready), bs):
            batch = ready[i:i + bs]
            t0 = time.perf_counter()
            for film, (pred, feature) in zip(batch, self._predict(predictor, batch)):
                if pred is None:
                    continue
                film.prediction = pred
                film.features = feature
                film.refused = eligibility.ood_reason(pred.ood_score, threshold)
            if self.metrics:
                per_image = (time.perf_counter() - t0) / len(batch)
                for _ in batch:
                    self.metrics.inference.observe(per_image)

    @staticmethod
    def _predict(predictor, batch: list[Film]) -> list[tuple]:
        """``(prediction, penultimate features)`` per film of the batch (features for the site heads,
        None when the predictor keeps none); when the batch fails, each film alone, and a film that
        fails alone is refused (``(None, None)`` in its place) so that the others are analysed."""
        try:
            preds = list(predictor.predict([f.x for f in batch], explain=True))
            feats = getattr(predictor, "last_features", None)
            return [(p, None if feats is None else feats[j]) for j, p in enumerate(preds)]
        except Exception as e:  # which film? ask each alone
            if len(batch) == 1:
                film = batch[0]
                log.warning("film %s: the model could not analyse it (%s); refused",
                            film.instance.sop_instance_uid, type(e).__name__)
                log.debug("inference failure", exc_info=True)
                film.refused = eligibility.unusable_pixels(
                    f"the model could not analyse the film ({type(e).__name__})")
                return [(None, None)]
            return [p for f in batch for p in Processor._predict(predictor, [f])]

    def triage(self, predictor, work: list[StudyWork]) -> list[StudyWork]:
        """Each study with its station's site calibration when it has one for these weights, else
        with the model's own operating points. Returns the studies that go on; a study this stage
        cannot triage is failed here."""
        from cxr_node.onboarding import site_adaptation

        cals = stations.active_calibrations(self.db)
        heads = site_adaptation.active_heads(self.db)
        ok = []
        for w in work:
            try:
                self._triage_study(predictor, w, cals, heads)
                ok.append(w)
            except Exception as e:  # this study only
                log.error("triage of study %s failed: %s", w.study_uid, type(e).__name__)
                log.debug("triage failure", exc_info=True)
                self.fail(w.study_uid, w.version, f"triage failed: {type(e).__name__}: {e}")
        return ok

    def _triage_study(self, predictor, w: StudyWork, cals: dict, heads: dict) -> None:
        """One study: the station's calibration (temperature, operating points) and its site heads
        (the critical classes' own probabilities from the film's features) when it has them."""
        import dataclasses

        import numpy as np

        from cxr_node.model.adaptation import apply_site_heads
        from cxr_node.model.calibration import logits_from, softmax
        from cxr_node.onboarding import site_adaptation

        cal = cals.get(w.station.name) if w.station is not None else None
        if cal is not None and cal.weights_sha256 != predictor.weights_sha256:
            log.warning("station %s: site calibration v%d was fitted for other model weights; using the "
                        "model's operating points (run `cxr-node calibrate-site --station %s` again)",
                        w.station.name, cal.version, w.station.name)
            cal = None
        w.calibration = cal
        policy, model = predictor.policy, self._identity
        if cal is not None:
            policy = dataclasses.replace(policy, thresholds=dict(cal.thresholds))
            model = dataclasses.replace(model, thresholds=dict(cal.thresholds),
                                        calibration=stations.calibration_name(cal),
                                        temperature=cal.temperature)
        head = site_adaptation.heads_for(heads.get(w.station.name) if w.station is not None else None,
                                         predictor.weights_sha256)
        if head is not None:  # the station's own heads decide their critical classes
            th = {**dict(policy.thresholds), **{c: float(h["threshold"]) for c, h in head.heads.items()}}
            policy = dataclasses.replace(policy, thresholds=th)
            model = dataclasses.replace(model, thresholds=th, calibration=site_adaptation.head_name(head))
        w.model = model
        for film in w.films:
            if film.refused is None and film.prediction is not None:
                p = film.prediction
                if cal is not None:  # the same logits, the site's temperature
                    q = softmax(logits_from([p.probabilities], predictor.temperature), cal.temperature)[0]
                    k = int(np.argmax(q))
                    p = dataclasses.replace(p, probabilities=tuple(float(x) for x in q),
                                            top_label=p.labels[k], top_probability=float(q[k]))
                if head is not None and film.features is not None:
                    q = apply_site_heads(p.probabilities, list(p.labels), film.features, head.heads)
                    k = int(np.argmax(q))
                    p = dataclasses.replace(p, probabilities=q, top_label=p.labels[k], top_probability=q[k])
                film.prediction = policy.apply(p)

    def encode(self, w: StudyWork) -> tuple[list, Dataset | None]:
        """The Secondary Capture of each analysed film and the study's SR (naming refused films)."""
        from cxr_node.encode.sc import build_sc
        from cxr_node.encode.sr import AnalysedFilm, RefusedFilm, build_sr

        model = w.model or self._identity
        analysed, written = [], []
        for n, film in enumerate(w.analysed, start=1):
            sc = build_sc(film.ds, film.full if film.full is not None else film.display, film.prediction, model,
                          instance_number=n, box=film.box, lung_mask=film.lungs.mask if film.lungs is not None else None,
                          max_rows=self.settings.outbox.sc_max_rows)
            film.full = None  # up to tens of MB per film: not kept past its SC
            written.append(self.outbox.write(sc, "sc"))
            analysed.append(AnalysedFilm(film.ds, sc, film.prediction))
        sr = None
        if w.films and (self.settings.eligibility.report_non_chest
                        or any(eligibility.chest_by_header(f.refused) for f in w.films)):
            sr = build_sr(analysed, model, study_version=w.version, predecessor=self._predecessor(w),
                          refused=[RefusedFilm(f.ds, f.refused) for f in w.refused])
            written.append(self.outbox.write(sr, "sr"))
        return written, sr

    def record(self, w: StudyWork, written: list, sr: Dataset | None) -> None:
        """Outbox rows, image results, audit rows and the state change, in one transaction."""
        results.record(self.settings, self.db, self.outbox, w, written, sr, w.model or self._identity,
                       self._predictor.temperature)

    def _predecessor(self, w: StudyWork) -> Dataset | None:
        """The SR this version revises: read from the outbox copy when it is still there."""
        with self.db.session() as s:
            st = s.get(Study, w.study_uid)
            last = st.last_sr_uid if st else None
        if not last or last == self._identity.sr_uid(w.study_uid, w.version):
            return None
        path = self.outbox.dir / result_path(w.study_uid, last)
        if path.is_file():
            return dcmread(path, stop_before_pixels=True)
        ref = Dataset()
        ref.StudyInstanceUID, ref.SOPInstanceUID = w.study_uid, last
        ref.SeriesInstanceUID = self._identity.sr_series_uid(w.study_uid)
        ref.SOPClassUID = Comprehensive3DSRStorage
        return ref
