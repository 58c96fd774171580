"""What a reader reads: the words and numbers the SR, the Secondary Capture and the console share.

One place decides how a probability is written (a percentage with at most 3 significant digits,
never exponent notation, "< 0.1%" below that), which output speaks for a film (p(abnormal) for a
model with an abnormality output, the critical class that raised the flag for one without), whose
operating point it was compared with (the site's, or the model's "not yet calibrated at this site")
and the one-sentence call. Pure Python: the console and the pipeline import it without highdicom.

The classifier's labels are *patterns* ("pattern most like COVID-19"), never diagnoses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

NOT_CALIBRATED = "operating point not yet calibrated at this site"
NOT_A_DIAGNOSIS = "Research triage, not a diagnosis."
ABNORMAL = "abnormal"
#: how a label reads; others read as they are spelled in the checkpoint
DISPLAY = {"covid": "COVID-19", "covid-19": "COVID-19", "viral pneumonia": "Viral pneumonia", "normal": "Normal",
           "no finding": "No finding", "other pneumonia": "Other pneumonia", "tuberculosis": "Tuberculosis"}
_NORMAL = ("normal", "no finding", "no_finding")


def display(label: str) -> str:
    return DISPLAY.get(label.strip().lower(), label)


def is_normal(label: str) -> bool:
    return label.strip().lower() in _NORMAL


def significant(x: float, digits: int = 3) -> str:
    """``x`` (>= 0) as a plain decimal with at most ``digits`` significant digits, no exponent:
    87.123 -> '87.1', 40.0 -> '40', 0.004037 -> '0.00404', 99.96 -> '100'."""
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"not a probability-like value: {x!r}")
    if x == 0:
        return "0"
    exp = math.floor(math.log10(x))
    decimals = digits - 1 - exp
    r = round(x, decimals)
    if r and math.floor(math.log10(r)) > exp:  # 99.96 -> 100: one digit fewer after the point
        decimals -= 1
    text = f"{r:.{max(0, decimals)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def percent(p: float, digits: int = 3) -> str:
    """A probability as a percentage: 0.8712 -> '87.1%', 0.4 -> '40%', 0.00168 -> '0.168%',
    4.04e-05 -> '< 0.1%'; ``digits=2`` for headlines (0.8712 -> '87%')."""
    v = 100.0 * float(p)
    if v == 0:
        return "0%"
    if v < 0.1:
        return "< 0.1%"
    return f"{significant(v, digits)}%"


def percent_value(p: float) -> str:
    """A probability as a DICOM DS percentage (a plain decimal, 3 significant digits at most, no
    exponent, at most 16 characters): 0.8712 -> '87.1', 4.0377e-05 -> '0.00404'."""
    v = 100.0 * float(p)
    return significant(v) if v >= 1e-9 else "0"


@dataclass(frozen=True)
class Call:
    """The output that speaks for one film, and how it compares with its operating point."""

    priority: str                 # urgent / review / routine
    output: str                   # "abnormal" (p(abnormal)) or the pattern label that speaks
    probability: float
    threshold: float | None       # the operating point it was compared with (None: it had none)
    site_calibrated: bool         # the site's operating point (True) or the model's (False)
    pattern: str | None = None    # the pattern the film looks most like (not normal), when one is above 0

    @property
    def above(self) -> bool | None:
        return None if self.threshold is None else self.probability >= self.threshold

    @property
    def is_abnormality(self) -> bool:
        return self.output == ABNORMAL

    def finding(self) -> str:
        """The worklist's top finding: 'abnormal 87%', 'COVID-19 45%'."""
        name = ABNORMAL if self.is_abnormality else display(self.output)
        return f"{name} {percent(self.probability, 2)}"

    def operating_point(self, article: bool = True) -> str:
        """"the site's operating point 40%" or "the model's operating point 40% (not yet calibrated at
        this site)"."""
        if self.threshold is None:
            return "no operating point"
        whose = "the site's" if self.site_calibrated else "the model's"
        text = f"{whose if article else ''} operating point {percent(self.threshold, 2)}".strip()
        return text if self.site_calibrated else f"{text} (not yet calibrated at this site)"


def _most_like(labels: Sequence[str], probabilities: Sequence[float]) -> str | None:
    patterns = [(float(p), n) for n, p in zip(labels, probabilities) if not is_normal(n)]
    return max(patterns)[1] if patterns else None


def call_for(prediction: Any, model: Any) -> Call:
    """The call of one analysed film: ``prediction`` is a Finding (prediction + decision), ``model`` a
    :class:`cxr_node.encode.identity.ModelIdentity` (its operating points and whose they are)."""
    labels, probs = list(prediction.labels), [float(x) for x in prediction.probabilities]
    p = dict(zip(labels, probs))
    priority = str(getattr(prediction, "priority", "routine") or "routine")
    calibrated = getattr(model, "calibration", "model") != "model"
    thresholds = dict(getattr(model, "thresholds", {}) or {})
    abnormal = getattr(prediction, "abnormal", None)
    like = _most_like(labels, probs)
    if abnormal is not None and getattr(model, "abnormal_threshold", None) is not None:
        t = float(model.abnormal_threshold)
        triggers = [n for n in getattr(model, "pattern_triggers", ()) if n in p and n in thresholds
                    and p[n] >= thresholds[n]]
        if priority == "urgent" and abnormal < t and triggers:  # a pattern the site named raised it
            n = max(triggers, key=lambda k: p[k] - thresholds[k])
            return Call(priority, n, p[n], thresholds[n], calibrated, like)
        return Call(priority, ABNORMAL, float(abnormal), t, calibrated, like)
    # no abnormality output (v2): the critical class furthest above its operating point speaks
    critical = [n for n in getattr(model, "critical_labels", ()) if n in p] or \
        [n for n in thresholds if n in p and not is_normal(n)]
    above = [(p[n] - thresholds[n], n) for n in thresholds if n in p and not is_normal(n) and p[n] >= thresholds[n]]
    if priority != "routine" and above:
        n = max(above)[1]
    elif critical:
        n = max(critical, key=lambda k: p[k] - thresholds.get(k, 0.0))
    else:
        n = like or labels[probs.index(max(probs))]
    return Call(priority, n, p[n], thresholds.get(n), calibrated, like)


def _subject(c: Call) -> str:
    return "abnormal chest radiograph" if c.is_abnormality else f"{display(c.output)} pattern"


def summary(calls: Sequence[Call], refused: int = 0) -> str:
    """The SR's first text item: the study's call in one sentence, plus the notice.
    'Urgent: abnormal chest radiograph 87%, above the site's operating point 40%. Research triage,
    not a diagnosis.'"""
    if not calls:
        n = "film" if refused == 1 else "films"
        return f"Not analysed: {refused} {n} sent, none could be analysed (each film's reason is below). " \
               + NOT_A_DIAGNOSIS
    order = ("urgent", "review", "routine")
    c = min(calls, key=lambda x: (order.index(x.priority) if x.priority in order else 3, -x.probability))
    text = f"{c.priority.capitalize()}: {_subject(c)} {percent(c.probability, 2)}"
    if c.above is not None:
        text += f", {'above' if c.above else 'below'} {c.operating_point()}"
    if c.priority == "review":
        text += "; not urgent"
    if len(calls) > 1:
        text += f" (the most urgent of {len(calls)} films)"
    text += "."
    if refused:
        text += f" {refused} more {'film was' if refused == 1 else 'films were'} not analysed."
    return f"{text} {NOT_A_DIAGNOSIS}"


def headline(c: Call) -> str:
    """The SC's call: 'URGENT: abnormal 87% (operating point 40%); pattern most like COVID-19'; for a
    model without an abnormality output 'URGENT: COVID-19 pattern 45% (operating point 30%)'."""
    op = "" if c.threshold is None else f" (operating point {percent(c.threshold, 2)})"
    if c.is_abnormality:
        text = f"{c.priority.upper()}: abnormal {percent(c.probability, 2)}{op}"
        if c.priority != "routine" and c.pattern is not None:
            text += f"; pattern most like {display(c.pattern)}"
        return text
    return f"{c.priority.upper()}: {display(c.output)} pattern {percent(c.probability, 2)}{op}"


def algorithm_parameter(model: Any) -> str:
    """TID 4019's Algorithm Parameters: which operating point the results used and whose it is
    ("operating point on p(abnormal) 40%: the model's (operating point not yet calibrated at this
    site)"; a site calibration by its name and temperature, as SRs have said it since v2)."""
    t = getattr(model, "abnormal_threshold", None)
    head = f"operating point on p(abnormal) {percent(t)}: " if t is not None else ""
    if getattr(model, "calibration", "model") == "model":
        return f"{head or 'operating points: '}the model's ({NOT_CALIBRATED})"
    temperature = getattr(model, "temperature", None)
    return f"{head}calibration {model.calibration}" + (f" temperature {temperature:.4f}"
                                                       if temperature is not None else "")


def top_finding(prediction: Any, model: Any) -> tuple[str, float]:
    """What the worklist names for a film, decided at triage time (image_results.finding): for a
    model with an abnormality output ("abnormal", p(abnormal)) (or the pattern a site let raise the
    flag, when it did); without one the class that raised the flag, else for a review call the most
    probable non-normal class, else the top class; with its probability."""
    c = call_for(prediction, model)
    if c.is_abnormality or (c.priority == "urgent" and c.above):
        return c.output, c.probability
    p = dict(zip(prediction.labels, (float(x) for x in prediction.probabilities)))
    if c.priority == "review" and c.pattern is not None:
        return c.pattern, p[c.pattern]
    top = str(prediction.top_label)
    return top, p.get(top, max(p.values()))
