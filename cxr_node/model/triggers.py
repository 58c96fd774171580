"""Which outputs may raise a study to urgent (``[triage] triggers``, or a station's own), and the
priority the node sends, never lower than one the study carries from upstream.

An *output* is a name the model answers with a probability and has an operating point for:
``abnormal`` (the abnormality output, ``Prediction.abnormal``, where the model has one) and each
class or pattern label ("COVID-19", "Viral Pneumonia"), matched case-insensitively. With no
triggers the policy's own decision stands (urgent from the model's critical outputs). With
triggers, a film is urgent when a trigger output is at or above its operating point, and only
then: an urgent call from any other output becomes "review", with the reason.

Priorities sent (HL7 table 0485, which FHIR's request-priority mirrors): ``S`` stat for an urgent
call, ``R`` routine otherwise; upstream, a Requested Procedure Priority (0040,1003) STAT is ``S``,
HIGH is ``A`` (ASAP), and a C-STORE request's Priority HIGH is ``A``. The node sends the higher of
its own and upstream's: a triage aid never lowers a priority that someone else set.

Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

ABNORMAL = "abnormal"
#: HL7 0485 priorities, lowest first; FHIR request-priority codes beside them
ORDER = ("R", "A", "S")
FHIR_PRIORITY = {"R": "routine", "A": "asap", "S": "stat"}
NAMES = {"R": "routine", "A": "ASAP", "S": "STAT"}
_REQUESTED = {"STAT": "S", "HIGH": "A", "ASAP": "A", "MEDIUM": "R", "ROUTINE": "R", "LOW": "R"}
DIMSE_HIGH = 1


def operating_points(thresholds: Mapping[str, float], abnormal_threshold: float | None) -> dict[str, float]:
    """Every output's operating point by name: the labels' thresholds, and ``abnormal`` where the model
    has an abnormality output (``TriagePolicy.abnormal_threshold``, ``ModelIdentity.abnormal_threshold``)."""
    ops = dict(thresholds)
    if abnormal_threshold is not None:
        ops[ABNORMAL] = float(abnormal_threshold)
    return ops


def outputs(finding: Any, thresholds: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Output name (lower case) -> (probability, operating point) for a film's prediction;
    ``thresholds`` as :func:`operating_points` gives them."""
    out = {}
    for label, p in zip(finding.labels, finding.probabilities):
        if label in thresholds:
            out[label.lower()] = (float(p), float(thresholds[label]))
    abnormal = getattr(finding, "abnormal", None)
    op = thresholds.get(ABNORMAL)
    if abnormal is not None and op is not None:
        out[ABNORMAL] = (float(abnormal), float(op))
    return out


def unknown(triggers: Iterable[str], finding: Any, thresholds: Mapping[str, float]) -> list[str]:
    """The triggers this model has no output (with an operating point) for."""
    have = outputs(finding, thresholds)
    return [t for t in triggers if t.lower() not in have]


def apply(finding: Any, triggers: Sequence[str], thresholds: Mapping[str, float]) -> Any:
    """``finding`` (a :class:`cxr_node.model.policy.Finding`) decided by ``triggers``; unchanged when
    there are none."""
    if not triggers:
        return finding
    from cxr_node.model.policy import Decision

    have = outputs(finding, thresholds)
    fired = [f"{t} {have[t.lower()][0]:.3f} >= operating point {have[t.lower()][1]:.3f} ([triage] trigger)"
             for t in triggers if t.lower() in have and have[t.lower()][0] >= have[t.lower()][1]]
    if fired:
        return dataclasses.replace(finding, decision=Decision(True, "urgent", tuple(fired)))
    if finding.urgent:
        why = (f"{r} (not a [triage] trigger: review, not urgent)" for r in finding.reasons)
        return dataclasses.replace(finding, decision=Decision(False, "review", tuple(why)))
    return finding


@dataclass(frozen=True)
class Upstream:
    """A priority the study already carries: the HL7 0485 code and where it came from."""
    code: str
    source: str


def upstream(dimse_priorities: Iterable[int | None], requested: Iterable[Any]) -> Upstream | None:
    """The highest priority the study's instances carry: their C-STORE Priority and their Requested
    Procedure Priority (0040,1003) values. None when nothing above routine was given."""
    best: Upstream | None = None
    for v in requested:
        code = _REQUESTED.get(str(v or "").strip().upper())
        if code and (best is None or ORDER.index(code) > ORDER.index(best.code)):
            best = Upstream(code, f"Requested Procedure Priority {str(v).strip().upper()}")
    if any(p == DIMSE_HIGH for p in dimse_priorities) and (best is None or best.code == "R"):
        best = Upstream("A", "C-STORE Priority HIGH")
    return best if best is not None and best.code != "R" else None


def node_priority(call: str | None) -> str:
    return "S" if call == "urgent" else "R"


def sent_priority(call: str | None, up: Upstream | None) -> str:
    """What the node sends: its own call's priority, never lower than upstream's."""
    mine = node_priority(call)
    if up is not None and ORDER.index(up.code) > ORDER.index(mine):
        return up.code
    return mine
