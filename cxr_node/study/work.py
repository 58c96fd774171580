"""What the pipeline carries for each claimed study and film between its stages."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from cxr_node.db.models import Instance
from cxr_node.eligibility.refusal import Refusal

log = logging.getLogger(__name__)


@dataclass(eq=False)  # a film is itself: compared by identity (it holds arrays)
class Film:
    instance: Instance
    ds: Dataset
    x: object = None        # preprocessed tensor
    display: object = None  # film for the overlay (downscaled, as the lung fields were found on it)
    full: object = None     # the same film at the source's resolution, for the Secondary Capture
    lungs: object = None    # cxr_node.model.lungs.LungFields
    box: object = None      # lung crop applied to the model input, or None
    prediction: object = None  # cxr_node.model.infer.Prediction, then cxr_node.model.policy.Finding
    refused: Refusal | None = None  # why this film was not analysed (code + text)
    stats: dict | None = None   # image size and intensity, for drift
    features: object = None     # pooled penultimate features (site heads: cxr_node.onboarding.site_adaptation)
    charset: str | None = None  # how its text was made writable (cxr_node.encode.charset), when it took a change


@dataclass
class StudyWork:
    study_uid: str
    version: int
    films: list[Film] = field(default_factory=list)                       # candidates for triage
    skipped: list[tuple[Instance, Refusal]] = field(default_factory=list)  # never candidates
    station: object = None      # cxr_node.onboarding.stations.StationRef
    calibration: object = None  # the station's SiteCalibration for these weights, or None
    model: object = None        # the ModelIdentity its results carry (thresholds, calibration, triggers)
    # across the worker's rounds (cxr_node.study.scheduling)
    seq: int = 0                # claim order on this node
    rank: int = 1               # the sender's urgency (DIMSE Priority as a rank, 0 most urgent)
    mark: int = 0               # the worker's film count when it last got a film (or was claimed)
    todo: list[Film] = field(default_factory=list)     # films still to analyse, in their order
    written: list = field(default_factory=list)        # outbox objects made so far (the SCs)
    encoded: list = field(default_factory=list)        # cxr_node.encode.sr.AnalysedFilm per SC
    policy: object = None       # cxr_node.study.triage.study_policy's tuple, chosen once per study
    #: a priority the study carries from upstream (cxr_node.model.triggers.Upstream: C-STORE Priority
    #: HIGH, Requested Procedure Priority STAT/HIGH), or None; the node never sends a lower one
    upstream: object = None

    @property
    def call(self) -> str | None:
        """The node's call for the study: the most pressing priority of its analysed films."""
        order = ("urgent", "review", "routine")
        found = [f.prediction.priority for f in self.analysed if f.prediction is not None]
        return min(found, key=lambda p: order.index(p) if p in order else len(order), default=None)

    @property
    def sent_priority(self) -> str:
        """The priority the node sends (HL7 0485 S/A/R): its call's, never below :attr:`upstream`'s."""
        from cxr_node.model.triggers import sent_priority

        return sent_priority(self.call, self.upstream)

    @property
    def key(self) -> tuple[str, int]:
        return (self.study_uid, self.version)

    @property
    def analysed(self) -> list[Film]:
        return [f for f in self.films if f.refused is None]

    @property
    def refused(self) -> list[Film]:
        return [f for f in self.films if f.refused is not None]


def as_int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def element(ds: Dataset, keyword: str):
    """``ds.get(keyword)``, or None when pydicom cannot read the value (a malformed element is the
    eligibility rules' business, not a reason to stop the study)."""
    try:
        return ds.get(keyword)
    except Exception:  # pydicom converts lazily and raises many types for malformed values
        log.debug("element %s of a spooled film cannot be read", keyword, exc_info=True)
        return None
