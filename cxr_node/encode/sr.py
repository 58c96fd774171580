"""The study's TID 1500 report for one study version, in a Comprehensive SR (no 3D coordinates are
written, and Comprehensive 3D SR is a SOP class several PACS viewers do not render): an AI triage
estimate, not a diagnosis. docs/sr.md shows the tree, the codes and what the validators say.

The root's first container (Qualitative Evaluations) opens with the call in one sentence (DCM 121106
"Comment": "Urgent: abnormal chest radiograph 87%, above the site's operating point 40%. Research
triage, not a diagnosis.", :func:`cxr_node.encode.wording.summary`), then the study's urgency (SCT
260870009 "Priority") and the notice. The title names what the document is (:data:`TITLE`).

One measurement group per analysed film: tracking identifier and UID, algorithm identification
(TID 4019: name, version, and as its parameter the operating point and whose it is: the site
calibration's, or the model's "not yet calibrated at this site"), then its findings as TID 300
measurements, each a probability in percent (DCM 122157 "Probability", UCUM "%", at most 3
significant digits, never an exponent) with what it is about as a concept modifier (SCT 246090004
"Associated finding"), whether it is above its operating point, then that operating point (DCM
122411 "Threshold Value"). For a model with an abnormality output (v5) the first is the abnormality
estimate (SCT 263654008 "Abnormal", CID 222's code for it) carrying the film's priority; the
classifier's labels follow, each named as a pattern (TID 300's "Equivalent Meaning of Concept Name"
says "pattern most like COVID-19; a pattern, not a diagnosis"). Without one (v2) every class is a
probability as before, the film's priority on the first. The film and its Secondary Capture are the
source images. No "Present"/"Absent" for a disease the model only estimates.

A film that was sent for triage but not analysed (no lung fields, outside the training
distribution, a header that is not a frontal chest film, unusable pixels) gets a group of its own
whose finding is "Not analysed" with the reason as a coded evaluation (:func:`reason_code`), so it
never looks like a film with no finding. A revised study (a late image) gets a new SR naming the
earlier one in PredecessorDocumentsSequence.

Standard codes wherever one exists; the private scheme ``99CXRNODE`` (declared in the SR's Coding
Scheme Identification Sequence, each code listed in docs/integration.md and docs/conformance.md) only where
none does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from cxr_node.eligibility.refusal import Refusal, RefusalCode
from cxr_node.encode import wording
from cxr_node.encode.identity import DEVICE_NAME, MANUFACTURER, ModelIdentity, contributing_equipment, with_type2

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "cxr-node triage report - NOT FOR DIAGNOSTIC USE"
PRIVATE_SCHEME = "99CXRNODE"

#: A title a reader understands, on TID 1500's own title code: viewers show the Code Meaning, and
#: pixelmed validates TID 1500 only under one of CID 7021's four codes (a title of our own,
#: 99CXRNODE, left 44 items "not in template"). pixelmed warns once that the meaning differs from
#: "Imaging Measurement Report" (docs/sr.md).
TITLE = Code("126000", "DCM", "Chest X-ray AI triage estimate (Imaging Measurement Report)")
REPORT_NAME = "cxr-node chest X-ray AI triage estimate"
NOTICE_TEXT = ("Research triage, not for diagnostic use: probabilities estimated by an AI model from the "
               "film alone and compared with operating points; not a diagnosis, not reviewed by a person.")
FINDING = Code("121071", "DCM", "Finding")
PROCEDURE_REPORTED = Code("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD = Code("122411", "DCM", "Threshold Value")
ASSOCIATED_FINDING = Code("246090004", "SCT", "Associated finding")
ABOVE_OPERATING_POINT = Code("ABOVEOP", PRIVATE_SCHEME, "Above operating point")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
UNIT_PERCENT = Code("%", "UCUM", "percent")
#: the abnormality estimate's subject: SNOMED CT's qualifier value "Abnormal" (CID 222 Normality Codes)
ABNORMAL = Code("263654008", "SCT", "Abnormal")
#: TID 300 row 16: says in words that a class is a pattern
EQUIVALENT_MEANING = Code("121050", "DCM", "Equivalent Meaning of Concept Name")
PRIORITY = Code("260870009", "SCT", "Priority")
#: urgent / review / routine (cxr_node.model.policy). SNOMED has Urgent and Routine qualifier values;
#: "review" (not urgent, but not normal either) has no standard code.
PRIORITY_CODES = {
    "urgent": Code("103391001", "SCT", "Urgent"),
    "review": Code("REVIEW", PRIVATE_SCHEME, "Review (not urgent)"),
    "routine": Code("50811001", "SCT", "Routine"),
}

#: Standard codes for the labels we know; any other label gets a code in our private scheme.
KNOWN_LABELS = {
    "covid": Code("840539006", "SCT", "COVID-19"),
    "covid-19": Code("840539006", "SCT", "COVID-19"),
    "viral pneumonia": Code("75570004", "SCT", "Viral pneumonia"),
    "normal": Code("17621005", "SCT", "Normal"),
}


def label_code(label: str) -> Code:
    if label == wording.ABNORMAL:
        return ABNORMAL
    known = KNOWN_LABELS.get(label.strip().lower())
    if known:
        return known
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label.strip()).strip("-").upper()[:16] or "LABEL"
    return Code(slug, PRIVATE_SCHEME, label[:64])


def priority_code(priority: str) -> Code:
    return PRIORITY_CODES[priority]




NOT_ANALYSED = Code("NOTANALYSED", PRIVATE_SCHEME, "Not analysed")
REASON_NOT_ANALYSED = Code("REASON", PRIVATE_SCHEME, "Reason not analysed")
#: Coded reason per refusal code (cxr_node.eligibility.refusal.RefusalCode); the text is in the audit trail.
_NO_LUNGS = Code("NOLUNGS", PRIVATE_SCHEME, "No plausible lung fields found")
REASON_CODES = {
    RefusalCode.NO_LUNG_FIELDS: _NO_LUNGS,
    RefusalCode.OUT_OF_DOMAIN: Code("OOD", PRIVATE_SCHEME, "Outside the model's training distribution"),
    RefusalCode.HEADER: Code("HEADER", PRIVATE_SCHEME, "Header: not a frontal chest film"),
    RefusalCode.NOT_CHEST: Code("HEADER", PRIVATE_SCHEME, "Header: not a frontal chest film"),
    RefusalCode.PIXELS: Code("PIXELS", PRIVATE_SCHEME, "Pixels unusable"),
    RefusalCode.UNREADABLE: Code("UNREADABLE", PRIVATE_SCHEME, "File or header element unreadable"),
}
OTHER_REASON = Code("OTHER", PRIVATE_SCHEME, "Not analysed for another reason")


def reason_code(refusal: Refusal) -> Code:
    """The SR's coded reason for a refusal: from its code, never from its wording."""
    return REASON_CODES.get(refusal.code, OTHER_REASON)


@dataclass(frozen=True)
class RefusedFilm:
    source: Dataset        # the film as received (header)
    reason: Refusal        # why it was not analysed: the code is what the SR carries


@dataclass(frozen=True)
class AnalysedFilm:
    source: Dataset        # the film as received (header is enough; pixels not needed)
    sc: Dataset            # its Secondary Capture
    prediction: object     # cxr_node.model.infer.Prediction


def _ref(ds: Dataset) -> Dataset:
    """A minimal dataset naming an object: what highdicom needs for evidence and predecessors."""
    r = Dataset()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(r, kw, ds.get(kw))
    return r


def _request(source: Dataset) -> list[Dataset]:
    """ReferencedRequestSequence items copied from the source's request context, if it has one:
    one per Request Attributes item, else one from the Accession Number alone."""
    def item(req: Dataset | None) -> Dataset:
        it = Dataset()
        it.StudyInstanceUID = source.StudyInstanceUID
        it.AccessionNumber = source.get("AccessionNumber", "")
        it.RequestedProcedureID = req.get("RequestedProcedureID", "") if req else ""
        it.PlacerOrderNumberImagingServiceRequest = ""
        it.FillerOrderNumberImagingServiceRequest = ""
        it.RequestedProcedureDescription = req.get("RequestedProcedureDescription", "") if req else ""
        it.RequestedProcedureCodeSequence = []
        it.ReferencedStudySequence = []  # Type 2 in the Referenced Request macro
        return it

    requests = list(source.get("RequestAttributesSequence", []) or [])
    if requests:
        return [item(r) for r in requests]
    return [item(None)] if source.get("AccessionNumber") else []


def _num(name: Code, p: float):
    """A TID 300 measurement of a probability in percent, its value a plain decimal with at most 3
    significant digits (DS '87.1', '0.00404'; never '4.04e-05'), and no FD copy with more digits."""
    import highdicom as hd

    text = wording.percent_value(p)
    m = hd.sr.Measurement(name=name, value=float(text), unit=UNIT_PERCENT)
    mv = m[0].MeasuredValueSequence[0]
    mv.NumericValue = text
    if "FloatingPointValue" in mv:
        del mv.FloatingPointValue
    return m


def _probability(label: str, p: float, threshold: float | None, *, pattern: bool = False,
                 priority: str | None = None):
    """TID 300: the probability with what it is about (and, for a pattern, that it is one) and
    whether it is above the operating point (TID 300 row 2 concept modifiers; the film's priority
    too on its first measurement); then the operating point."""
    import highdicom as hd

    finding = label_code(label)
    prob = _num(PROBABILITY, p)
    mods = [hd.sr.CodeContentItem(ASSOCIATED_FINDING, finding, relationship_type="HAS CONCEPT MOD")]
    if threshold is not None:
        mods.append(hd.sr.CodeContentItem(ABOVE_OPERATING_POINT, YES if p >= threshold else NO,
                                          relationship_type="HAS CONCEPT MOD"))
    if priority is not None:
        mods.append(hd.sr.CodeContentItem(PRIORITY, priority_code(priority), relationship_type="HAS CONCEPT MOD"))
    if pattern:
        mods.append(hd.sr.TextContentItem(
            EQUIVALENT_MEANING, f"pattern most like {wording.display(label)} (not a diagnosis)",
            relationship_type="HAS CONCEPT MOD"))
    _add_children(prob[0], mods)
    out = [prob]
    if threshold is not None:
        op = _num(THRESHOLD, threshold)
        _add_children(op[0], [hd.sr.CodeContentItem(ASSOCIATED_FINDING, finding, relationship_type="HAS CONCEPT MOD")])
        out.append(op)
    return out


def _film_measurements(p, model: ModelIdentity) -> list:
    """A film's measurements: with an abnormality output the abnormality estimate first (with the
    film's priority) and the patterns after it, a pattern's operating point only when the site lets
    it raise the flag; without one every class with its operating point (but the normal class, whose
    threshold decides nothing), the priority on the first."""
    labels, probs = list(p.labels), [float(x) for x in p.probabilities]
    abnormal = getattr(p, "abnormal", None)
    if abnormal is not None and model.abnormal_threshold is not None:
        out = _probability(wording.ABNORMAL, float(abnormal), model.abnormal_threshold, priority=p.priority)
        for label, prob in zip(labels, probs):
            t = model.thresholds.get(label) if label in model.pattern_triggers else None
            out += _probability(label, prob, t, pattern=True)
        return out
    out = []  # the normal class's threshold decides nothing (cxr_node.model.policy): not shown
    for i, (label, prob) in enumerate(zip(labels, probs)):
        t = None if wording.is_normal(label) else model.thresholds.get(label)
        out += _probability(label, prob, t, priority=p.priority if i == 0 else None)
    return out


def _separate(container: Dataset) -> None:
    """Every container SEPARATE: its items are a list of facts, not one flowing text, so that a viewer
    (dcmtk's dsr2html among them) shows each value with its name ("Probability: 87.1 %")."""
    container.ContinuityOfContent = "SEPARATE"
    for item in container.get("ContentSequence", []):
        if item.ValueType == "CONTAINER":
            _separate(item)


def _add_children(item: Dataset, children: list) -> None:
    if "ContentSequence" not in item:
        item.ContentSequence = []
    item.ContentSequence.extend(children)


def build_sr(films: Sequence[AnalysedFilm], model: ModelIdentity, *, study_version: int,
             predecessor: Dataset | None = None, refused: Sequence[RefusedFilm] = ()) -> Dataset:
    """The study's SR. ``predecessor`` (any dataset with the four UIDs) is the SR it revises;
    ``refused`` are the films sent for triage that were not analysed, each with its reason."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not films and not refused:
        raise ValueError("an SR needs at least one analysed or refused film")
    first = (films[0] if films else refused[0]).source
    study_uid = first.StudyInstanceUID
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=DEVICE_NAME, manufacturer_name=MANUFACTURER, model_name=model.name[:64]),
    )
    # TID 4019 needs a name and a version; its one parameter is the operating point and whose it is
    # (a site calibration's, with its temperature, or the model's, not yet calibrated at this site)
    params = [wording.algorithm_parameter(model)]
    algorithm = hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64], parameters=params)
    groups = []
    for i, film in enumerate(films, start=1):
        measurements = _film_measurements(film.prediction, model)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=model.tracking_uid(film.source.SOPInstanceUID), identifier=f"cxr-node film {i}"),
            algorithm_id=algorithm,
            measurements=measurements,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup(film.source.SOPClassUID, film.source.SOPInstanceUID),
                hd.sr.SourceImageForMeasurementGroup(film.sc.SOPClassUID, film.sc.SOPInstanceUID),
            ],
        )
        groups.append(group)
    for j, film in enumerate(refused, start=len(films) + 1):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=model.tracking_uid(film.source.SOPInstanceUID), identifier=f"cxr-node film {j}"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, NOT_ANALYSED),
                                     hd.sr.QualitativeEvaluation(REASON_NOT_ANALYSED, reason_code(film.reason))],
            source_images=[hd.sr.SourceImageForMeasurementGroup(film.source.SOPClassUID, film.source.SOPInstanceUID)],
        ))
    # ImageLibrary entries need ImagerPixelSpacing in highdicom
    library = [f.source for f in list(films) + list(refused) if "ImagerPixelSpacing" in f.source]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=TITLE,
        referenced_images=library or None,
    )
    # TID 1500 rows 12-14, the Qualitative Evaluations container, put before the measurements so that a
    # viewer shows it first: the call in one sentence, the study's urgency, the notice
    study_priority = min((f.prediction.priority for f in films), key=_rank, default=None)
    evaluations = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    call = wording.summary([wording.call_for(f.prediction, model) for f in films], refused=len(refused))
    items = [hd.sr.TextContentItem(COMMENT, call, relationship_type="CONTAINS")]
    if study_priority is not None:
        items.append(hd.sr.CodeContentItem(PRIORITY, priority_code(study_priority), relationship_type="CONTAINS"))
    items.append(hd.sr.TextContentItem(COMMENT, f"{REPORT_NAME}. {NOTICE_TEXT}", relationship_type="CONTAINS"))
    evaluations.ContentSequence = items
    root = report[0].ContentSequence
    at = next(i for i, it in enumerate(root) if it.ValueType == "CONTAINER")
    root.insert(at, evaluations)
    _separate(report[0])
    evidence = [with_type2(f.source) for f in films] + [f.sc for f in films] + [with_type2(f.source) for f in refused]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=model.sr_series_uid(study_uid),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=model.sr_uid(study_uid, study_version),
        instance_number=study_version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        requested_procedures=_request(first) or None,
        previous_versions=[_ref(predecessor)] if predecessor is not None else None,
        contributing_equipment=[contributing_equipment(model, device_uid=False)],
        series_description=SR_SERIES_DESCRIPTION,
    )
    for kw in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if kw in first and not sr.get(kw):
            setattr(sr, kw, first.get(kw))
    # PS3.3 8.2 / C.12.1: a private coding scheme used in the document is identified in the SOP Common
    # module's Coding Scheme Identification Sequence, so a reader can tell who owns "99CXRNODE"
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "cxr-node local codes (concepts without a standard code; see its conformance statement)"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [item]
    return sr


def _rank(priority: str) -> int:
    order = tuple(PRIORITY_CODES)
    return order.index(priority) if priority in order else len(order)


def _code(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def _key(code: Code) -> tuple[str, str]:
    return code.value, code.scheme_designator


def read_report(sr_dataset: Dataset) -> dict:
    """The study-level part of an SR we wrote: ``title``, ``summary`` (the call in one sentence),
    ``priority`` (urgent/review/routine or None when no film was analysed) and ``notice``; plus
    ``films`` (:func:`read_findings`)."""
    by_meaning = {c.meaning: k for k, c in PRIORITY_CODES.items()}
    out = {"title": sr_dataset.ConceptNameCodeSequence[0].CodeMeaning, "summary": None, "priority": None,
           "notice": None}
    for item in sr_dataset.ContentSequence:
        if item.ValueType == "CONTAINER" and _code(item) == _key(QUALITATIVE_EVALUATIONS):
            for sub in item.get("ContentSequence", []):
                if sub.ValueType == "CODE" and _code(sub) == _key(PRIORITY):
                    out["priority"] = by_meaning.get(sub.ConceptCodeSequence[0].CodeMeaning)
                elif sub.ValueType == "TEXT" and _code(sub) == _key(COMMENT):
                    out["summary" if out["summary"] is None else "notice"] = str(sub.TextValue)
    out["films"] = read_findings(sr_dataset)
    return out


def _fraction(item: Dataset) -> float:
    """A NUM item's value as a fraction: ours are percent (UCUM '%'); SRs written before were '1'."""
    mv = item.MeasuredValueSequence[0]
    v = float(mv.NumericValue)
    return v / 100.0 if mv.MeasurementUnitsCodeSequence[0].CodeValue == "%" else v


def read_findings(sr_dataset: Dataset) -> list[dict]:
    """Read an SR we wrote back into plain findings, one dict per measurement group (film):
    ``tracking_uid``, ``finding`` ("Not analysed" for a refused film, else None), ``priority``
    (urgent/review/routine), ``abnormal`` (p(abnormal) or None), ``abnormal_threshold``,
    ``probabilities`` {class: p} (the patterns for a v5 model), ``thresholds`` {class: operating
    point}, ``above`` {class: bool}, ``patterns`` (the classes named as patterns), ``evaluations``
    {name: value} (the refusal reason) and ``source_sop_uids``. Probabilities are fractions."""
    import highdicom as hd

    # SRs written before this version are Comprehensive 3D SR; a just-built object is parsed again too
    cls = hd.sr.Comprehensive3DSR if str(sr_dataset.SOPClassUID).endswith(".88.34") else hd.sr.ComprehensiveSR
    sr = cls.from_dataset(sr_dataset)
    by_meaning = {c.meaning: k for k, c in PRIORITY_CODES.items()}
    out = []
    for group in sr.content.get_image_measurement_groups():
        container = group[0]
        g = {"tracking_uid": group.tracking_uid, "finding": None, "priority": None, "abnormal": None,
             "abnormal_threshold": None, "probabilities": {}, "thresholds": {}, "above": {}, "patterns": [],
             "evaluations": {}, "source_sop_uids": []}
        for item in container.ContentSequence:
            key = _code(item)
            if item.ValueType == "CODE":
                value = item.ConceptCodeSequence[0].CodeMeaning
                if key == _key(FINDING):  # highdicom's getter skips DCM 121071 "Finding"
                    g["finding"] = value
                elif key == _key(PRIORITY):  # SRs written before the priority moved onto the first measurement
                    g["priority"] = by_meaning.get(value)
                else:
                    g["evaluations"][item.ConceptNameCodeSequence[0].CodeMeaning] = value
            elif item.ValueType == "NUM":
                subs = list(item.get("ContentSequence", []))
                mods = {_code(m): m.ConceptCodeSequence[0].CodeMeaning for m in subs if m.ValueType == "CODE"}
                label = mods.get(_key(ASSOCIATED_FINDING))
                value = _fraction(item)
                if _key(PRIORITY) in mods:
                    g["priority"] = by_meaning.get(mods[_key(PRIORITY)])
                if key == _key(PROBABILITY) and label == ABNORMAL.meaning:
                    g["abnormal"] = value
                elif key == _key(THRESHOLD) and label == ABNORMAL.meaning:
                    g["abnormal_threshold"] = value
                elif key == _key(PROBABILITY) and label:
                    g["probabilities"][label] = value
                    if _key(ABOVE_OPERATING_POINT) in mods:
                        g["above"][label] = mods[_key(ABOVE_OPERATING_POINT)] == YES.meaning
                    if any(m.ValueType == "TEXT" and _code(m) == _key(EQUIVALENT_MEANING) for m in subs):
                        g["patterns"].append(label)
                elif key == _key(THRESHOLD) and label:
                    g["thresholds"][label] = value
            elif item.ValueType == "IMAGE":
                g["source_sop_uids"].append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        out.append(g)
    return out
