"""Operating-point policy: probabilities -> urgent flag and priority.

With an abnormality output (the v5 model, :mod:`cxr_node.model.abnormality`):

* ``urgent``  p(abnormal) >= its operating point (the checkpoint's cross-fitted one, or the station's
  site calibration), or a pattern the site named in ``pattern_triggers`` is at or above its own
  threshold;
* ``routine`` otherwise. The classifier's labels are patterns: secondary, never a diagnosis.

Without one (v2 and earlier checkpoints):

* ``urgent``  a critical class (COVID by default) has probability >= its operating threshold;
  the threshold is chosen on the validation split (``training.train.calibrate``) for sensitivity >= 0.95.
* ``review``  not urgent, but the top class is not the normal class (e.g. Viral Pneumonia), or a
  non-critical class is at or above its own threshold.
* ``routine`` otherwise.

Pure Python, no torch: cheap to import from the daemon's scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

PRIORITIES = ("urgent", "review", "routine")
NORMAL_NAMES = ("normal", "no finding", "no_finding")


@dataclass(frozen=True)
class Decision:
    urgent: bool
    priority: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    """A model's prediction (:class:`cxr_node.model.infer.Prediction`) with the policy's decision.
    Reads like the prediction (labels, probabilities, cam, ...) plus ``urgent``, ``priority``
    and ``reasons``."""

    prediction: Any
    decision: Decision

    @property
    def urgent(self) -> bool:
        return self.decision.urgent

    @property
    def priority(self) -> str:
        return self.decision.priority

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.decision.reasons

    def __getattr__(self, name: str) -> Any:
        if name in ("prediction", "decision"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.prediction, name)

    def as_dict(self, include_cam: bool = False) -> dict[str, Any]:
        return {**self.prediction.as_dict(include_cam), "urgent": self.urgent, "priority": self.priority,
                "reasons": list(self.reasons)}


@dataclass(frozen=True)
class TriagePolicy:
    labels: tuple[str, ...]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    critical_labels: tuple[str, ...] = ()
    normal_label: str | None = None
    #: the operating point on p(abnormal); None: the checkpoint has no abnormality output
    abnormal_threshold: float | None = None
    #: pattern labels that may raise the urgent flag beside p(abnormal), each at its own threshold
    pattern_triggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"a policy needs at least 2 labels (got {self.labels!r})")
        for name in self.critical_labels:
            if name not in self.labels:
                raise ValueError(f"critical label {name!r} is not one of {', '.join(self.labels)}")
            if name not in self.thresholds:
                raise ValueError(f"critical label {name!r} has no operating threshold")
        for name, t in self.thresholds.items():
            if name not in self.labels:
                raise ValueError(f"threshold for unknown label {name!r}")
            if not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold for {name!r} must be a number in [0, 1] (got {t!r})")
        if self.normal_label is not None and self.normal_label not in self.labels:
            raise ValueError(f"normal label {self.normal_label!r} is not one of {', '.join(self.labels)}")
        t = self.abnormal_threshold
        if t is not None and (not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 <= t <= 1.0):
            raise ValueError(f"abnormal operating point must be a number in [0, 1] (got {t!r})")
        for name in self.pattern_triggers:
            if t is None:
                raise ValueError("pattern triggers need an abnormality output (this model has none)")
            if name not in self.labels or name == self.normal_label:
                raise ValueError(f"pattern trigger {name!r} is not a pattern of this model "
                                 f"({', '.join(n for n in self.labels if n != self.normal_label)})")
            if name not in self.thresholds:
                raise ValueError(f"pattern trigger {name!r} has no threshold")

    @property
    def has_abnormality(self) -> bool:
        return self.abnormal_threshold is not None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], abnormality: Any = None) -> "TriagePolicy":
        """The checkpoint's policy; with an abnormality head (``AbnormalityHead``) urgency is p(abnormal)'s
        and no pattern raises it until a site names it a trigger."""
        labels = tuple(meta["labels"])
        critical = tuple(meta.get("critical_labels") or ())
        normal = next((n for n in labels if n.lower() in NORMAL_NAMES), None)
        thresholds = {k: float(v) for k, v in meta["thresholds"].items()}
        if abnormality is not None:
            return cls(labels=labels, thresholds=thresholds, critical_labels=(), normal_label=normal,
                       abnormal_threshold=float(abnormality.threshold))
        return cls(labels=labels, thresholds=thresholds, critical_labels=critical, normal_label=normal)

    def apply(self, prediction: Any) -> Finding:
        """The decision for a :class:`cxr_node.model.infer.Prediction`, kept together with it."""
        return Finding(prediction, self.decide(prediction.probabilities, getattr(prediction, "abnormal", None)))

    def decide(self, probabilities: Sequence[float], abnormal: float | None = None) -> Decision:
        if len(probabilities) != len(self.labels):
            raise ValueError(f"expected {len(self.labels)} probabilities, got {len(probabilities)}")
        p = dict(zip(self.labels, (float(x) for x in probabilities)))
        if self.abnormal_threshold is not None:
            if abnormal is None:
                raise ValueError("this policy decides on p(abnormal), and the prediction has none")
            t = self.abnormal_threshold
            reasons = [f"abnormal {abnormal:.3f} >= operating point {t:.3f}"] if abnormal >= t else []
            reasons += [f"pattern {n} {p[n]:.3f} >= threshold {self.thresholds[n]:.3f}"
                        for n in self.pattern_triggers if p[n] >= self.thresholds[n]]
            if reasons:
                return Decision(True, "urgent", tuple(reasons))
            return Decision(False, "routine", ())
        reasons = [f"{n} {p[n]:.3f} >= threshold {self.thresholds[n]:.3f}"
                   for n in self.critical_labels if p[n] >= self.thresholds[n]]
        if reasons:
            return Decision(True, "urgent", tuple(reasons))
        top = max(self.labels, key=lambda n: p[n])
        review = [f"{n} {p[n]:.3f} >= threshold {t:.3f}" for n, t in self.thresholds.items()
                  if n not in self.critical_labels and n != self.normal_label and p[n] >= t]
        if self.normal_label is not None and top != self.normal_label:
            review.insert(0, f"top class {top} ({p[top]:.3f})")
        if review:
            return Decision(False, "review", tuple(review))
        return Decision(False, "routine", ())
