"""Processing complete studies: the stages in order, readable top to bottom in :meth:`Processor._run`.

The worker runs in rounds (:mod:`cxr_node.study.scheduling`): it holds the studies it claimed,
analyses at most ``[study] round_films`` of their films per round, one study after the other, and
records each study as soon as its last film is analysed, so no study's results wait for another
study's films.

    load         claim queued studies, read each film's header from the spool (pixels: in its round)
    eligibility  header rules (cxr_node.eligibility.rules): SOP class, body part, view
    preprocess   the one MONAI chain (cxr_node.model.preprocess.prepare): LUTs, CLAHE, lung fields,
                 lung crop when the model was trained with it, resize; films without two
                 plausible lung fields are refused here
    infer        probabilities, out-of-domain score, Grad-CAM (cxr_node.model.infer), in batches;
                 films outside the training distribution are refused here
    triage       operating points -> urgent flag and priority (cxr_node.study.triage); a study
                 from a station with a site calibration (cxr_node.onboarding.stations) uses that
                 station's temperature and operating points, and its results say so
    encode       a Secondary Capture per analysed film, and once a study's films are done, one SR
                 naming refused films; no SR for a study none of whose films is a chest film by its
                 header
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
from sqlalchemy import select

from cxr_node.config import Settings
from cxr_node.db.models import Instance, Study, utcnow
from cxr_node.db.session import Database
from cxr_node.eligibility import rules as eligibility
from cxr_node.eligibility.refusal import Refusal, RefusalCode
from cxr_node.errors import CheckpointError, PreprocessError
from cxr_node.logs import redact_quoted
from cxr_node.onboarding import stations
from cxr_node.outbox.queue import Outbox
from cxr_node.study import results, scheduling, triage
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
        self._held: dict[tuple[str, int], StudyWork] = {}  # claimed, not yet recorded (scheduling)
        self._seq = 0
        self._limit = 8
        self._films = 0  # films analysed by this worker (scheduling counts starvation in them)

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

    def preload(self, stop=None) -> None:
        """Load the model now (``serve`` calls this in a background thread at start-up, so the first
        study does not wait for it); :meth:`predictor` stays the lazy path if this fails. Then warm
        it up: one synthetic film through every stage but the record (:mod:`cxr_node.study.warmup`).
        A study arriving meanwhile waits for the warm-up (the load lock); ``stop`` (an Event) ends the
        warm-up early when the node stops meanwhile."""
        from cxr_node.study.warmup import warm_up

        with self._load_lock:
            predictor = self._load()
            t0 = time.perf_counter()
            warm_up(predictor, self._segmenter, self._identity, self.settings.outbox.sc_max_rows, stop)
            log.info("model warmed up in %.1f s", time.perf_counter() - t0)

    # ------------------------------------------------------------------ the pipeline

    def requeue_interrupted(self) -> int:
        """At start-up: studies a crash left in ``processing`` go back to ``queued`` (failed once they
        have been interrupted ``[study] max_attempts`` times)."""
        return studies.requeue_interrupted(self.db, self.node_id, self.settings.study.max_attempts)

    def process_queued(self, limit: int = 8) -> int:
        """One round of the worker (:mod:`cxr_node.study.scheduling`): claim queued studies while
        fewer than ``limit`` are held, then analyse at most ``[study] round_films`` of the held
        studies' films and record every study whose films are all done. Returns how many studies
        the round touched (0: nothing held, nothing queued)."""
        self._limit = limit
        room = limit - len(self._held)
        if room > 0:
            order = scheduling.claim_order(Study, self.settings.study.round_films, utcnow())
            claimed = studies.claim(self.db, room, self.node_id, order=order)
            if claimed:
                self.admit(claimed)
        if not self._held:
            return 0
        try:
            predictor = self.predictor()
        except CheckpointError as e:
            held = list(self._held.values())
            for w in held:
                self._drop(w, str(e))
            return len(held)
        tickets = [scheduling.Ticket(k, len(w.todo), w.seq, w.rank, self._films - w.mark)
                   for k, w in self._held.items()]
        picks = scheduling.plan(tickets, self.settings.study.round_films)
        self.run_round(predictor, [(self._held[k], self._held[k].todo[:n]) for k, n in picks])
        return len(picks)

    def admit(self, claimed: list[tuple[str, int]]) -> None:
        """Claimed studies join the held ones: headers read, header rules applied, stations noted."""
        new = []
        for uid, version in claimed:
            try:
                w = self.load(uid, version)
            except Exception as e:  # the database or the spool, for this study: failed, retried
                log.error("loading study %s failed: %s", uid, type(e).__name__)
                log.debug("load failure", exc_info=True)
                self.fail(uid, version, f"loading failed: {type(e).__name__}: {e}")
                continue
            self._seq += 1
            w.seq, w.mark = self._seq, self._films
            self._held[w.key] = w
            new.append(w)
        if new:
            stations.ensure(self.db, [w.station for w in new])              # new stations audited once

    def release_held(self, why: str) -> int:
        """The node stops: held studies go back to the queue (this claim not counted as an attempt),
        so that no study waits for this node's rounds; their films are analysed again from the
        start (the objects already written are made again, with the same UIDs)."""
        held = list(self._held.values())
        self._held.clear()
        return studies.release(self.db, [w.key for w in held], why)

    def run_round(self, predictor, rnd: list[tuple[StudyWork, list[Film]]]) -> None:
        """The stages over one round. No study is left held by a fault: a film that breaks a
        stage is refused with its reason, a study that breaks one is failed (and retried, bounded),
        and a fault no stage caught sends each study's share of the round through alone, so that
        one study cannot take the others down with it."""
        try:
            self._run(predictor, rnd)
        except Exception as e:  # not one film's or one study's fault as far as the stages could tell
            log.error("a round of %d stud(ies) failed (%s); those still held are run one by one",
                      len(rnd), type(e).__name__)
            log.debug("round failure", exc_info=True)
            if len(rnd) == 1:
                self._drop(rnd[0][0], f"processing failed: {type(e).__name__}: {e}")
                return
            for w, films in rnd:
                if w.key not in self._held:
                    continue
                try:
                    self._run(predictor, [(w, [f for f in films if f in w.todo])])
                except Exception as e1:  # this study's own fault: failed, retried with backoff
                    log.debug("study failure", exc_info=True)
                    self._drop(w, f"processing failed: {type(e1).__name__}: {e1}")

    def _run(self, predictor, rnd: list[tuple[StudyWork, list[Film]]]) -> None:
        """One study after the other, each recorded as soon as its films are done; a study's share
        of several films goes film by film, and the round ends early once a study is queued that
        this node has room to claim (it is planned with the others at once: it waits for one
        film, not for the round)."""
        ctx = self.triage_context()
        self._analyse_together(predictor, rnd)
        done, cut = [], False
        for w, films in rnd:
            for piece in ([f] for f in films) if len(films) > 1 else [films]:
                outcome = self._study_part(predictor, w, piece, ctx)
                if outcome:
                    done.append(w)
                if outcome is None or outcome:
                    break
                if self._arrived():
                    cut = True
                    break
            if cut or self._arrived():
                break
        self.drift(predictor, {w.station.name for w in done if w.station is not None})

    def _analyse_together(self, predictor, rnd: list[tuple[StudyWork, list[Film]]]) -> None:
        """The round's one-film shares (a burst of small studies) preprocessed and analysed as one
        batch: one forward pass with Grad-CAM for up to batch_size films, not one each (bench/stages.py)."""
        singles = [films[0] for _, films in rnd if len(films) == 1 and films[0].prediction is None]
        if len(singles) > 1:  # (a share cut off from the last round was analysed then)
            self.preprocess(predictor, singles)
            self.infer(predictor, singles)
            log.debug("analysed %d one-film shares of a round together", len(singles))

    def _study_part(self, predictor, w: StudyWork, films: list[Film], ctx) -> bool | None:
        """``films`` of study ``w`` through every stage; True once the study is recorded, False
        while it has films left, None if it failed (recorded as failed, no longer held)."""
        fresh = [f for f in films if f.prediction is None]  # the round's batch may have analysed them
        self.preprocess(predictor, fresh)                                 # pixels, lung fields, crop
        self.infer(predictor, fresh)                                      # probabilities, OOD, Grad-CAM
        self._films += len(films)
        w.mark = self._films  # starvation is counted in the films others had meanwhile
        try:
            self.triage(predictor, w, films, *ctx)                        # operating points -> priority
        except Exception as e:  # this study only
            log.error("triage of study %s failed: %s", w.study_uid, type(e).__name__)
            log.debug("triage failure", exc_info=True)
            self._drop(w, f"triage failed: {type(e).__name__}: {e}")
            return None
        try:
            for film in films:
                self.encode_film(w, film)                                 # SC per analysed film
                w.todo.remove(film)                                       # (by identity)
            if w.todo:
                return False
            sr = self.encode_sr(w)                                        # SR per study
            self.record(w, w.written, sr)                                 # outbox + results + audit + state
            self._held.pop(w.key, None)
            return True
        except Exception as e:  # one broken study must not stop the others; it is recorded
            log.error("processing study %s failed: %s", w.study_uid, type(e).__name__)
            log.debug("study failure", exc_info=True)
            self._drop(w, f"{type(e).__name__}: {e}")
            return None

    def _arrived(self) -> bool:
        """A study is queued and this node has room to claim it."""
        return len(self._held) < self._limit and studies.any_queued(self.db)

    def _drop(self, w: StudyWork, reason: str) -> None:
        self._held.pop(w.key, None)
        self.fail(w.study_uid, w.version, reason)

    def fail(self, study_uid: str, version: int, reason: str) -> None:
        """The study failed this attempt: recorded, and queued again after the backoff while the
        configured attempts last (``[study] max_attempts``, ``retry_seconds``). ``reason`` often
        carries an exception's text, and library messages quote the values they judge (a patient
        name among them): quoted parts are withheld before it reaches the audit trail and the log."""
        st = self.settings.study
        studies.fail(self.db, study_uid, version, redact_quoted(reason)[:2000], max_attempts=st.max_attempts,
                     retry_seconds=st.retry_seconds, node_id=self.node_id)

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
        """Read the study's films' headers and apply the header rules (why not, per image); the
        pixels are read in the film's round (:meth:`preprocess`), so a held study costs memory
        for its headers only."""
        from cxr_node.encode import charset

        work = StudyWork(study_uid, version)
        rules = eligibility.settings_rules(self.settings)
        with self.db.session() as s:
            instances = list(s.scalars(select(Instance).where(Instance.study_uid == study_uid)
                                       .order_by(Instance.received_at)))
            rank = s.scalar(select(Study.upstream_rank).where(Study.study_uid == study_uid))
        work.rank = scheduling.MEDIUM if rank is None else rank
        for inst in instances:
            if not inst.triage_eligible:
                work.skipped.append((inst, Refusal(RefusalCode.SOP_CLASS,
                                                   inst.not_for_triage_reason or "not a triage SOP class")))
                continue
            try:
                ds = dcmread(self.settings.storage.spool_dir / inst.path, stop_before_pixels=True)
            except Exception as e:  # the file was valid on receipt; anything now is an I/O or decode fault
                work.skipped.append((inst, eligibility.unreadable(
                    f"cannot read the spooled file: {type(e).__name__}: {e}")))
                continue
            note, refused = charset.make_writable(ds, inst.sop_instance_uid)
            if work.station is None:
                work.station = stations.resolve(self.settings, inst.calling_aet, element(ds, "StationName"),
                                                element(ds, "InstitutionName"))
            work.films.append(Film(inst, ds, refused=refused or eligibility.header_reason(ds, **rules),
                                   stats={"rows": as_int(element(ds, "Rows")), "cols": as_int(element(ds, "Columns"))},
                                   charset=note))
        if work.station is None:
            aet = instances[0].calling_aet if instances else None
            work.station = stations.resolve(self.settings, aet)
        from cxr_node.model.triggers import upstream

        work.upstream = upstream((i.dimse_priority for i in instances),
                                 (element(f.ds, "RequestedProcedurePriority") for f in work.films))
        work.todo = [f for f in work.films if f.refused is None]
        return work

    def preprocess(self, predictor, films: list[Film]) -> None:
        import numpy as np

        from cxr_node.model.preprocess import prepare

        check = self.settings.eligibility.check_pixels
        for film in films:
            if film.refused:
                continue
            try:
                full = dcmread(self.settings.storage.spool_dir / film.instance.path)
            except Exception as e:  # the file was valid on receipt; anything now is an I/O or decode fault
                film.refused = eligibility.unreadable(f"cannot read the spooled file: {type(e).__name__}: {e}")
                continue
            try:
                pr = prepare(full, predictor.params, self._segmenter)
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

    def triage_context(self) -> tuple[dict, dict]:
        """The active site calibrations and site heads, by station."""
        return triage.context(self.db)

    def triage(self, predictor, w: StudyWork, films: list[Film], cals: dict, heads: dict) -> None:
        """``films`` of one study, with its station's calibration and site heads when it has them
        for these weights (chosen in the study's first round, so that its films are triaged alike)."""
        if w.policy is None:
            w.policy = triage.study_policy(predictor, self._identity, w, cals, heads, self.settings)
        triage.apply_policy(predictor, films, *w.policy)

    def encode_film(self, w: StudyWork, film: Film) -> None:
        """The Secondary Capture of an analysed film (numbered in the study's film order); the
        film's pixels are not kept past it."""
        from cxr_node.encode.sc import build_sc
        from cxr_node.encode.sr import AnalysedFilm

        if film.refused is None and film.prediction is not None:
            try:
                sc = build_sc(film.ds, film.full if film.full is not None else film.display, film.prediction,
                              w.model or self._identity, instance_number=len(w.encoded) + 1, box=film.box,
                              lung_mask=film.lungs.mask if film.lungs is not None else None,
                              max_rows=self.settings.outbox.sc_max_rows)
            except ValueError as e:  # highdicom judged a header value: the film is refused, the SR says so
                film.refused = eligibility.unreadable(
                    f"its Secondary Capture could not be written from its header: {redact_quoted(str(e))[:160]}")
                log.warning("film %s: %s", film.instance.sop_instance_uid, film.refused.text)
            else:
                w.written.append(self.outbox.write(sc, "sc"))
                w.encoded.append(AnalysedFilm(film.ds, sc, film.prediction))
        film.full = film.display = film.x = film.lungs = None  # up to tens of MB per film

    def encode_sr(self, w: StudyWork) -> Dataset | None:
        """The study's SR (its analysed films, naming refused ones), written to the outbox; none for
        a study none of whose films is a chest film by its header."""
        from cxr_node.encode.sr import RefusedFilm, build_sr

        if not w.films or not (self.settings.eligibility.report_non_chest
                               or any(eligibility.chest_by_header(f.refused) for f in w.films)):
            return None
        sr = build_sr(w.encoded, w.model or self._identity, study_version=w.version,
                      predecessor=results.predecessor(self.db, self.outbox, self._identity, w), refused=[RefusedFilm(f.ds, f.refused) for f in w.refused])
        w.written.append(self.outbox.write(sr, "sr"))
        return sr

    def record(self, w: StudyWork, written: list, sr: Dataset | None) -> None:
        """Outbox rows, image results, audit rows and the state change, in one transaction."""
        results.record(self.settings, self.db, self.outbox, w, written, sr, w.model or self._identity,
                       self._predictor.temperature, node_id=self.node_id)
