"""The study's TID 1500 report for one study version (Comprehensive 3D SR): an AI triage estimate,
not a diagnosis.

Its root carries, in the Qualitative Evaluations
container, the study's urgency (SCT 260870009 "Priority": Urgent, Review or Routine) and the
report's name and the notice "research triage, not for diagnostic use" as a text item (DCM 121106
"Comment"). The title stays "Imaging Measurement Report" (see :data:`TITLE`).
One measurement group per analysed film: tracking identifier and UID, algorithm identification
(TID 4019: name and version; the site calibration and its temperature as the one parameter
when one is in force), the film's urgency, and for each class the probability (DCM 122157
"Probability", at most 3 significant digits, UCUM "1") with its class as a concept modifier (SCT
246090004 "Associated finding") and whether it is above the operating point, followed by that
operating point (DCM 122411 "Threshold Value"); the film and its Secondary Capture as source
images. No "Present"/"Absent" for a disease the model only estimates.

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
from cxr_node.encode.identity import DEVICE_NAME, MANUFACTURER, ModelIdentity, contributing_equipment, with_type2

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "cxr-node triage report - NOT FOR DIAGNOSTIC USE"
PRIVATE_SCHEME = "99CXRNODE"

#: The document title stays TID 1500's (CID 7021): pixelmed picks the root template by the title,
#: and with a title of our own (tried: 99CXRNODE "Chest X-ray AI triage estimate") it validated no
#: template at all (44 items "not in template"). The report is named in the first text item instead.
TITLE = Code("126000", "DCM", "Imaging Measurement Report")
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
UNIT_ONE = Code("1", "UCUM", "no units")
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
    known = KNOWN_LABELS.get(label.strip().lower())
    if known:
        return known
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label.strip()).strip("-").upper()[:16] or "LABEL"
    return Code(slug, PRIVATE_SCHEME, label[:64])


def priority_code(priority: str) -> Code:
    return PRIORITY_CODES[priority]


def significant(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits (0.95294 -> 0.953, 4.0377e-05 -> 4.04e-05)."""
    return float(f"{float(x):.{digits}g}")


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


def _probability(label: str, p: float, threshold: float | None):
    """TID 300: the class's probability (3 significant digits) with the class, and whether it is
    above the operating point, as concept modifiers (TID 300 row 2); then the operating point."""
    import highdicom as hd

    finding = label_code(label)
    prob = hd.sr.Measurement(name=PROBABILITY, value=significant(p), unit=UNIT_ONE)
    mods = [hd.sr.CodeContentItem(ASSOCIATED_FINDING, finding, relationship_type="HAS CONCEPT MOD")]
    if threshold is not None:
        mods.append(hd.sr.CodeContentItem(ABOVE_OPERATING_POINT, YES if p >= threshold else NO,
                                          relationship_type="HAS CONCEPT MOD"))
    _add_children(prob[0], mods)
    out = [prob]
    if threshold is not None:
        op = hd.sr.Measurement(name=THRESHOLD, value=significant(threshold), unit=UNIT_ONE)
        _add_children(op[0], [hd.sr.CodeContentItem(ASSOCIATED_FINDING, finding, relationship_type="HAS CONCEPT MOD")])
        out.append(op)
    return out


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
    # TID 4019 needs a name and a version; a site calibration changes the probabilities (its temperature)
    # and the operating points, so it is named as the one parameter
    params = None if model.calibration == "model" else [
        f"calibration {model.calibration}" + (f" temperature {model.temperature:.4f}"
                                              if model.temperature is not None else "")]
    algorithm = hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64], parameters=params)
    groups = []
    for i, film in enumerate(films, start=1):
        p = film.prediction
        measurements = [m for label, prob in zip(p.labels, p.probabilities)
                        for m in _probability(label, float(prob), model.thresholds.get(label))]
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
        _add_children(group[0], [hd.sr.CodeContentItem(PRIORITY, priority_code(p.priority),
                                                       relationship_type="CONTAINS")])
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
    # TID 1500 rows 12-14: the study's urgency and the notice, in the Qualitative Evaluations container
    study_priority = min((f.prediction.priority for f in films), key=_rank, default=None)
    evaluations = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    items = [hd.sr.TextContentItem(COMMENT, f"{REPORT_NAME}. {NOTICE_TEXT}", relationship_type="CONTAINS")]
    if study_priority is not None:
        items.insert(0, hd.sr.CodeContentItem(PRIORITY, priority_code(study_priority), relationship_type="CONTAINS"))
    evaluations.ContentSequence = items
    report[0].ContentSequence.append(evaluations)
    evidence = [with_type2(f.source) for f in films] + [f.sc for f in films] + [with_type2(f.source) for f in refused]
    sr = hd.sr.Comprehensive3DSR(
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
        contributing_equipment=[contributing_equipment(model)],
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
    """The study-level part of an SR we wrote: ``title``, ``priority`` (urgent/review/routine or
    None when no film was analysed) and ``notice``; plus ``films`` (:func:`read_findings`)."""
    by_meaning = {c.meaning: k for k, c in PRIORITY_CODES.items()}
    out = {"title": sr_dataset.ConceptNameCodeSequence[0].CodeMeaning, "priority": None, "notice": None}
    for item in sr_dataset.ContentSequence:
        if item.ValueType == "CONTAINER" and _code(item) == _key(QUALITATIVE_EVALUATIONS):
            for sub in item.get("ContentSequence", []):
                if sub.ValueType == "CODE" and _code(sub) == _key(PRIORITY):
                    out["priority"] = by_meaning.get(sub.ConceptCodeSequence[0].CodeMeaning)
                elif sub.ValueType == "TEXT" and _code(sub) == _key(COMMENT):
                    out["notice"] = str(sub.TextValue)
    out["films"] = read_findings(sr_dataset)
    return out


def read_findings(sr_dataset: Dataset) -> list[dict]:
    """Read an SR we wrote back into plain findings, one dict per measurement group (film):
    ``tracking_uid``, ``finding`` ("Not analysed" for a refused film, else None), ``priority``
    (urgent/review/routine), ``probabilities`` {class: p}, ``thresholds`` {class: operating point},
    ``above`` {class: bool}, ``evaluations`` {name: value} (the refusal reason) and ``source_sop_uids``."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_dataset) if not isinstance(sr_dataset, hd.sr.Comprehensive3DSR) \
        else sr_dataset
    by_meaning = {c.meaning: k for k, c in PRIORITY_CODES.items()}
    out = []
    for group in sr.content.get_image_measurement_groups():
        container = group[0]
        g = {"tracking_uid": group.tracking_uid, "finding": None, "priority": None, "probabilities": {},
             "thresholds": {}, "above": {}, "evaluations": {}, "source_sop_uids": []}
        for item in container.ContentSequence:
            key = _code(item)
            if item.ValueType == "CODE":
                value = item.ConceptCodeSequence[0].CodeMeaning
                if key == _key(FINDING):  # highdicom's getter skips DCM 121071 "Finding"
                    g["finding"] = value
                elif key == _key(PRIORITY):
                    g["priority"] = by_meaning.get(value)
                else:
                    g["evaluations"][item.ConceptNameCodeSequence[0].CodeMeaning] = value
            elif item.ValueType == "NUM":
                mods = {_code(m): m.ConceptCodeSequence[0].CodeMeaning
                        for m in item.get("ContentSequence", []) if m.ValueType == "CODE"}
                label = mods.get(_key(ASSOCIATED_FINDING))
                value = float(item.MeasuredValueSequence[0].NumericValue)
                if key == _key(PROBABILITY) and label:
                    g["probabilities"][label] = value
                    if _key(ABOVE_OPERATING_POINT) in mods:
                        g["above"][label] = mods[_key(ABOVE_OPERATING_POINT)] == YES.meaning
                elif key == _key(THRESHOLD) and label:
                    g["thresholds"][label] = value
            elif item.ValueType == "IMAGE":
                g["source_sop_uids"].append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        out.append(g)
    return out
