"""Every "analyse this film or not, and why" rule, in one place.

A film is analysed only when all of these hold, checked in this order (cheap first):

1. **SOP class** (at receipt): CR, DX or Secondary Capture image storage (:data:`TRIAGE_SOP_CLASSES`).
2. **Header**: ``BodyPartExamined`` empty or a chest value (``[eligibility] body_parts``) and
   ``ViewPosition`` empty or frontal (``[eligibility] views``). Cheap and self-explaining, but a
   header saying CHEST/PA does not make a film eligible by itself.
3. **Pixels**: usable (decodes, 2-D greyscale, large enough, not flat: :mod:`cxr_node.model.preprocess`).
4. **Lung fields** (:mod:`cxr_node.model.lungs`): two plausible lung fields (area, one on each side,
   height, confidence).
5. **Training distribution**: the classifier's own features are close enough to its training
   films (:class:`cxr_node.model.infer.OodReference`, threshold chosen on validation films).

A refused film gets no probabilities presented as a finding and no urgent flag; its reason is
audited (``image.skipped``), counted, and named in the study's SR.
"""

from __future__ import annotations

from typing import Any, Sequence

from cxr_node.eligibility.refusal import Refusal, RefusalCode

from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)

TRIAGE_SOP_CLASSES = frozenset({ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage})
DEFAULT_BODY_PARTS = ("CHEST", "THORAX")
DEFAULT_VIEWS = ("PA", "AP")
OUTSIDE_DISTRIBUTION = "outside the training distribution"
UNUSABLE_HEADER = "unusable header"
NOT_CHEST = "BodyPartExamined is"  # the header names another body part


def sop_class_reason(sop_class_uid: str) -> Refusal | None:
    if sop_class_uid in TRIAGE_SOP_CLASSES:
        return None
    from pydicom.uid import UID

    return Refusal(RefusalCode.SOP_CLASS,
                   f"SOP class {UID(sop_class_uid).name or sop_class_uid} is not a radiograph class cxr-node triages")


def header_reason(ds: Any, body_parts: Sequence[str] = DEFAULT_BODY_PARTS,
                  views: Sequence[str] = DEFAULT_VIEWS) -> Refusal | None:
    """None when the header allows a frontal chest film, else why it is not analysed. An element
    that cannot be read is a refusal too (``unreadable``), never an exception."""
    body = _header_text(ds, "BodyPartExamined")
    if isinstance(body, Refusal):
        return body
    if body and body not in body_parts:
        return Refusal(RefusalCode.NOT_CHEST, f"{NOT_CHEST} {body}, not a chest value ({', '.join(body_parts[:4])}...)")
    view = _header_text(ds, "ViewPosition")
    if isinstance(view, Refusal):
        return view
    if view and view not in views:
        return Refusal(RefusalCode.HEADER,
                       f"ViewPosition is {view}: only frontal ({'/'.join(views[:2])}) films are analysed")
    return None


def chest_by_header(reason: Refusal | None) -> bool:
    """Whether a film is a chest film by its header: every film except one whose header names
    another body part (a lateral chest film, or one refused for its pixels, still is). A study none
    of whose films is, was never a triage candidate and gets no SR (``[eligibility] report_non_chest``)."""
    return getattr(reason, "code", None) != RefusalCode.NOT_CHEST


def _header_text(ds: Any, keyword: str) -> str | Refusal:
    """The element as upper-case text ('' when absent), or an ``unreadable`` refusal when pydicom
    cannot read it (the text names the element, never its value)."""
    try:
        text = str(ds.get(keyword, "") or "").strip().upper()
        return "".join(c if c.isprintable() else "?" for c in text)
    except Exception as e:  # pydicom converts values lazily and raises many types for malformed ones
        return unreadable(f"{UNUSABLE_HEADER}: {keyword} cannot be read ({type(e).__name__})")


def unreadable(text: str) -> Refusal:
    """The spooled file, or a header element the chain needs, cannot be read."""
    return Refusal(RefusalCode.UNREADABLE, text)


def unusable_pixels(text: str) -> Refusal:
    """The pixels cannot be used (decoding, colour, size, blank) or the model could not take them."""
    return Refusal(RefusalCode.PIXELS, text if text.startswith("unusable pixels") else f"unusable pixels: {text}")


def preprocess_refusal(error: Exception) -> Refusal:
    """The refusal for a :class:`cxr_node.errors.PreprocessError` (its ``code`` when it carries one)."""
    code = getattr(error, "code", None)
    if code == RefusalCode.UNREADABLE:
        return unreadable(str(error))
    return unusable_pixels(str(error))


def lung_reason(lungs: Any) -> Refusal | None:
    """None when two plausible lung fields were found (a :class:`cxr_node.model.lungs.LungFields`)."""
    if lungs is None or lungs.reason is None:
        return None
    return Refusal(RefusalCode.NO_LUNG_FIELDS, lungs.reason)


def ood_reason(score: float | None, threshold: float | None) -> Refusal | None:
    if score is None or threshold is None or score <= threshold:
        return None
    return Refusal(RefusalCode.OUT_OF_DOMAIN, f"{OUTSIDE_DISTRIBUTION} (score {score:.1f}, threshold {threshold:.1f})")


def pixel_reason(lungs: Any, score: float | None, threshold: float | None) -> Refusal | None:
    """The pixel rules (4, 5) together, in the pipeline's order (training's out-of-domain report)."""
    return lung_reason(lungs) or ood_reason(score, threshold)


def settings_rules(settings: Any) -> dict[str, Any]:
    """``header_reason`` keyword arguments from the node's settings (``[eligibility]``)."""
    e = getattr(settings, "eligibility", None)
    if e is None:
        return {}
    return {"body_parts": tuple(e.body_parts), "views": tuple(e.views)}
